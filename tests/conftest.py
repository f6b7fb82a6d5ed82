"""Shared test set-up: one intra-op thread (the test machines have few cores, shared with other jobs)."""

import torch

torch.set_num_threads(1)
