"""What a search run needs besides the search itself: the fused-kernel scope, logs, held-out selection, run files.

``EvolQModule`` attaches :class:`FusedKernels`, :class:`SearchLogger` and :class:`HeldoutSelection` itself (where the
Trainer has none of their kind); they follow the module's own options. cli.py adds :class:`QuantMapFile` and
:class:`TestResultsFile`, so a run folder holds ``quant_map.txt`` and ``test_results.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from evolq_pl.quant.fused import fused_kernels
from evolq_pl.search.engine import Generation

if TYPE_CHECKING:
    from evolq_pl.module import EvolQModule

HELDOUT_TOP1 = "heldout/top1"


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
        report = outputs.get("generation") if isinstance(outputs, Mapping) else None
        if not isinstance(report, Generation):
            return  # a replayed tick after a resume: no generation ran
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


def _log_dir(trainer: Trainer) -> Path | None:
    return Path(trainer.log_dir) if trainer.log_dir else None


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
    """Writes the test top-1/top-5 with what was tested (model, bits, checkpoint, ...) to ``test_results.json``."""

    def on_test_end(self, trainer: Trainer, pl_module: EvolQModule) -> None:
        log_dir = _log_dir(trainer)
        if log_dir is None or not trainer.is_global_zero:
            return
        qconfig, hparams = pl_module.qconfig, pl_module.hparams
        results = {
            **pl_module.test_metrics, "model": hparams.model_name, "w_bits": qconfig.w_bits, "a_bits": qconfig.a_bits,
            "preset": qconfig.preset, "seed": hparams.seed, "evaluated": "fp" if hparams.eval_fp else "quantized",
            "ckpt": str(trainer.ckpt_path) if trainer.ckpt_path else None, "quant_config": repr(qconfig),
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "test_results.json").write_text(json.dumps(results, indent=2) + "\n")
        rank_zero_info(f"test results written to {log_dir / 'test_results.json'}")
