"""Shared test set-up: one intra-op thread (the test machines have few cores, shared with other jobs)."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory):
    """A 3-block ViT trained for eight epochs on the shipped demo images (a real, non-degenerate model)."""
    from evolq_pl.testing import train_tiny_vit

    return str(train_tiny_vit(tmp_path_factory.mktemp("tiny") / "tiny_vit.pth"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)"))])
def device(request) -> torch.device:
    """The devices a bit-for-bit check runs on: the CPU always, a CUDA GPU where there is one."""
    return torch.device(request.param)
