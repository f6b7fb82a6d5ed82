"""Callbacks that cli.py adds: a held-out validation is in the checkpoint, so a stop right after it loses nothing."""

from __future__ import annotations

import torch

from evolq_pl.callbacks import CheckpointAfterHeldout, RunReport
from evolq_pl.cli import cli_main
from evolq_pl.search.engine import same_state


def scales(module) -> list[torch.Tensor]:
    return [layer.weight_quantizer.scale.clone() for block in module.blocks for layer in block.layers]


def test_a_heldout_selection_stopped_after_a_validation_resumes_as_if_uninterrupted(resumed_tiny_search, tmp_path):
    args, runs = resumed_tiny_search
    args = list(args)
    args[args.index("--trainer.logger.init_args.save_dir") + 1] = str(tmp_path)
    whole = cli_main(["fit", *args])
    resumed = runs["resumed"][0]
    assert any(isinstance(cb, CheckpointAfterHeldout) for cb in resumed.trainer.callbacks)
    assert same_state(resumed.model.engine.state_dict(), whole.model.engine.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(scales(resumed.model), scales(whole.model), strict=True))
    # the first visit's score, measured by the stopped run after its last checkpoint of a generation, was kept
    heldout = next(cb for cb in resumed.trainer.callbacks if isinstance(cb, RunReport)).record.heldout_top1
    assert len(heldout) == 3 and resumed.model.engine.state.best_heldout == max(heldout)
