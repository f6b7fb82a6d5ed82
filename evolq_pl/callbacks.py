"""What a search run needs besides the search itself: the fused-kernel scope, logs, held-out selection, run files.

``EvolQModule`` attaches :class:`FusedKernels`, :class:`SearchLogger` and :class:`HeldoutSelection` itself (where the
Trainer has none of their kind); they follow the module's own options. cli.py adds :class:`QuantMapFile`,
:class:`RunReport` and :class:`TestResultsFile`, so a run folder holds ``quant_map.txt``, ``report.png`` and
``test_results.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from evolq_pl.quant.fused import fused_kernels
from evolq_pl.report import SearchRecord, save_report, summary
from evolq_pl.results import RESULTS_FILE, test_record
from evolq_pl.search.engine import Generation

if TYPE_CHECKING:
    from evolq_pl.module import EvolQModule

HELDOUT_TOP1 = "heldout/top1"


def generation_of(outputs: Any) -> Generation | None:
    """The engine's report in a training step's outputs; None for a tick replayed after a resume (nothing ran)."""
    report = outputs.get("generation") if isinstance(outputs, Mapping) else None
    return report if isinstance(report, Generation) else None


class FusedKernels(Callback):
    """Sets the process-wide fused-kernel switch to the module's ``fused`` for one fit/validate/test and puts it back
    to what it was afterwards, also when the run fails (Lightning calls no teardown hook then)."""

    def __init__(self) -> None:
        self._scope = ExitStack()

    def setup(self, trainer: Trainer, pl_module: EvolQModule, stage: str) -> None:
        self._scope.enter_context(fused_kernels(pl_module.hparams.fused))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._scope.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._scope.close()


class SearchLogger(Callback):
    """Per generation: best/mean/child fitness, accepted, rejected, evaluations so far, seconds; per visit: fitness
    before/after and the mean relative scale change; block/pass/generation in the progress bar; a warning per
    non-finite candidate."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        report = generation_of(outputs)
        if report is None:
            return
        finite = [f for f in report.fitnesses if math.isfinite(f)]
        for value in report.fitnesses:
            if not math.isfinite(value):
                rank_zero_warn(f"block {report.block}: a candidate's fitness is {value}; it is rejected")
        pl_module.log_dict({
            "search/best_fitness": report.best_fitness,
            **{f"search/{key}": value for key, value in report.stats.items()},
            "search/child_fitness": min(finite) if finite else -1.0,
            "search/accepted": float(report.accepted),
            "search/rejected_nonfinite": float(len(report.fitnesses) - len(finite)),
            "search/evaluations": float(report.evaluations),
            "search/sec_per_generation": report.seconds,
        }, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log_dict({"block": float(report.block), "pass": float(report.pass_index),
                            "gen": float(report.index)}, prog_bar=True, logger=False, on_step=True, on_epoch=False,
                           rank_zero_only=True)
        visit = report.visit_summary
        if visit is not None:
            pl_module.log_dict({
                "visit/fitness_before": visit.fitness_before,
                "visit/fitness_after": visit.fitness_after,
                "visit/rel_scale_change": visit.rel_scale_change,
                "visit/block": float(visit.block),
            }, on_step=True, on_epoch=False, rank_zero_only=True)


class HeldoutSelection(Callback):
    """With the module's ``selection: heldout``: keeps the scales with the best held-out top-1 (the original's
    per-block selection, pointed at a split of train, never at the test set) and puts them back when the fit ends."""

    def on_validation_end(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        if (pl_module.hparams.selection == "heldout" and not trainer.sanity_checking and trainer.state.fn == "fit"
                and HELDOUT_TOP1 in trainer.callback_metrics):
            pl_module.engine.offer_heldout(float(trainer.callback_metrics[HELDOUT_TOP1]))

    def on_fit_end(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        state = pl_module.engine.state
        if state.best_snapshot is not None:
            pl_module.engine.restore(state.best_snapshot)
            rank_zero_info(f"restored the scales with the best held-out top-1 ({state.best_heldout:.2f})")


class CheckpointAfterHeldout(Checkpoint):
    """Rewrites the last checkpoint after each held-out validation of a fit.

    ModelCheckpoint writes ``last.ckpt`` after every generation, but not after the validation that follows a visit's
    last generation (that step is saved already), and a resumed run does not repeat that validation: a run stopped
    there (``max_epochs``, a kill before the next generation) would lose the held-out top-1, ``selection: heldout``'s
    snapshot and the report's point. Lightning calls a Checkpoint after the other callbacks, so the held-out offer
    is in the file. Append it after the ModelCheckpoint (``trainer.checkpoint_callback`` stays that one).
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path:
                trainer.save_checkpoint(callback.last_model_path)


def _log_dir(trainer: Trainer) -> Path | None:
    return Path(trainer.log_dir) if trainer.log_dir else None


class RunReport(Callback):
    """Draws ``report.png`` in the run folder when a fit ends (evolq_pl.report): the calibration fitness per
    generation, the gain of each block visit, the acceptance rate per pass and the held-out top-1 where measured.

    The series are the callback's state, which Lightning writes into every checkpoint (before the checkpoint of the
    same generation), so a search resumed with ``--ckpt_path last`` still draws from its first generation.
    """

    FILE = "report.png"

    def __init__(self) -> None:
        self.record = SearchRecord()

    def on_train_batch_end(self, trainer: Trainer, pl_module: EvolQModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        report = generation_of(outputs)
        if report is not None:
            self.record.add(report, pl_module.engine.config.num_cycles)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and HELDOUT_TOP1 in trainer.callback_metrics:
            self.record.add_heldout(float(trainer.callback_metrics[HELDOUT_TOP1]))

    def on_fit_end(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        log_dir = _log_dir(trainer)
        if log_dir is None or trainer.logger is None or not trainer.is_global_zero:
            return
        baseline = pl_module.baseline_fitness
        if not self.record or baseline is None:
            rank_zero_info(f"no generation ran, so no {self.FILE}")
            return
        hparams, qconfig = pl_module.hparams, pl_module.qconfig
        line = summary(self.record, baseline, hparams.fitness)
        title = (f"{hparams.model_name} W{qconfig.w_bits}A{qconfig.a_bits} ({qconfig.preset}), {hparams.strategy} "
                 f"search, seed {hparams.seed}: {line}")
        path = save_report(self.record, log_dir / self.FILE, baseline, title, hparams.fitness)
        rank_zero_info(f"search report: {path} ({line})")

    def state_dict(self) -> dict[str, Any]:
        return self.record.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record.load_state_dict(state_dict)


class QuantMapFile(Callback):
    """Prints the quantization map before a search or a test of the quantized model and saves it in the run's log
    folder as ``quant_map.txt``."""

    def on_train_start(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        rank_zero_info(pl_module.qmodel.format_quant_map())
        log_dir = _log_dir(trainer)
        if log_dir is not None and trainer.logger is not None and trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "quant_map.txt").write_text(pl_module.qmodel.format_quant_map() + "\n")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        if not pl_module.hparams.eval_fp:
            rank_zero_info(pl_module.qmodel.format_quant_map())


class TestResultsFile(Callback):
    """Writes the test top-1/top-5 with what was tested (model, bits, scales, checkpoint, test images, ...) to
    ``test_results.json`` (evolq_pl.results: what makes two of them comparable)."""

    def __init__(self) -> None:
        self.images = 0

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.images = 0

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.images += len(batch[1]) if isinstance(batch, list | tuple) else len(batch)

    def on_test_end(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        images = int(trainer.strategy.reduce(torch.tensor(self.images, device=pl_module.device), reduce_op="sum"))
        log_dir = _log_dir(trainer)
        if log_dir is None or not trainer.is_global_zero:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / RESULTS_FILE).write_text(json.dumps(test_record(trainer, pl_module, images), indent=2) + "\n")
        rank_zero_info(f"test results written to {log_dir / RESULTS_FILE}")
