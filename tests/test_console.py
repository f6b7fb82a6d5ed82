"""A fit through the CLI prints no warning we did not choose to show, and the silencing is scoped; it leaves
report.png in its run folder."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from evolq_pl.cli import cli_main
from evolq_pl.console import quiet_lightning

# shown on purpose: Lightning's hint to load images with workers, which it gives only where the machine has cores to
# spare (not on a 2-core machine) and which applies to image folders (the data modules' num_workers)
CHOSEN = ("The 'val_dataloader' does not have many workers", "The 'test_dataloader' does not have many workers")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def demo_fit_args(tmp_path, heldout: int) -> list[str]:
    """configs/demo.yaml (the shipped LeViT, W3A8) cut to one pass of one generation on 50 images."""
    return ["fit", "--config", "demo", "--model.num_passes", "1", "--model.num_cycles", "1",
            "--model.population_size", "3", "--model.tournament_size", "2", "--data.init_args.calib_size", "50",
            "--data.init_args.heldout_size", str(heldout), "--data.init_args.batch_size", "50",
            "--data.init_args.test_batch_size", "50", "--trainer.check_val_every_n_epoch", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]  # the progress bar on, as a user's fit has it


@pytest.mark.parametrize("heldout", [50, 0])
def test_a_demo_sized_fit_emits_no_warning_we_did_not_choose(tmp_path, monkeypatch, heldout):
    """With a held-out split; without one, stopped after 3 of 8 visits and resumed with --ckpt_path last."""
    monkeypatch.setattr(sys, "argv", ["evolq"])  # as a user runs it (pytest's own arguments make LightningCLI warn)
    records = _Records()
    lightning_log = logging.getLogger("lightning")
    lightning_log.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning, every time; but, as Python does for a user's program,
            warnings.simplefilter("ignore", DeprecationWarning)  # not deprecations raised inside libraries
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            if heldout:
                cli_main(demo_fit_args(tmp_path, heldout))
            else:
                cli_main([*demo_fit_args(tmp_path, heldout), "--trainer.max_epochs", "3"])
                cli_main([*demo_fit_args(tmp_path, heldout), "--ckpt_path", "last"])
    finally:
        lightning_log.removeHandler(records)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not str(w.message).startswith(CHOSEN)]
    assert shown == []
    assert not [m for m in records.messages if "Tip:" in m]
    assert any(m.startswith("calibrated levit_128s on 50 images") for m in records.messages)  # the handler sees info
    assert heldout or any(m.startswith("Restored all states") for m in records.messages)
    assert (tmp_path / "demo" / "version_0" / "report.png").is_file()
    assert any(m.startswith("search report:") and m.endswith("after 8 generations)") for m in records.messages)


def test_quiet_lightning_restores_the_warning_filters_and_the_logger():
    before = list(warnings.filters)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log_filters = list(logger.filters)
    with quiet_lightning():
        assert len(warnings.filters) > len(before) and len(logger.filters) == len(log_filters) + 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
                          "pre-optimization state was saved. The checkpoint will contain ...", UserWarning,
                          stacklevel=1)
            warnings.warn("Using ModelCheckpoint wrongly", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["Using ModelCheckpoint wrongly"]
    assert warnings.filters == before and logger.filters == log_filters
