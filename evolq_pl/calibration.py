"""Calibration and the teacher: what the search starts from, and what each process scores candidates against.

A mixin of :class:`~evolq_pl.module.EvolQModule`, kept apart so that the module reads as the search's adapter. It
needs ``self.qmodel``, ``self.blocks``, ``self.qconfig``, ``self.fitness_fn`` and ``self.hparams``. Calibration runs
once, on the data module's calibration batches; a checkpoint brings calibrated quantizers and skips it.
"""

from __future__ import annotations

import functools
import time

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from evolq_pl import run_checks
from evolq_pl.data import calibration_batches
from evolq_pl.quant.modes import calibrate, quantizers, set_quantized
from evolq_pl.search.evaluator import SuffixEvaluator, fp_teachers


class CalibratedTeacher(LightningModule):
    """Calibrate the quantizers once; build this process's FP teacher logits and the search's evaluator."""

    def init_calibration(self) -> None:
        self._calib: list[torch.Tensor] = []
        self.teacher_id: str | None = None  # identifies the calibration set and teacher, checked on resume

    def _calibration(self) -> list[torch.Tensor]:
        if not self._calib:
            self._calib = calibration_batches(getattr(self.trainer, "datamodule", None))
            self.qmodel.check_input(self._calib[0])
        return self._calib

    def _calibration_images(self) -> int:
        return sum(len(b) for b in self._calibration())

    def ensure_calibrated(self) -> None:
        """Calibrate unless a checkpoint already brought calibrated quantizers; either way switch them on."""
        self.take_selection()
        if all(bool(q.calibrated) for _, q in quantizers(self.qmodel)):
            set_quantized(self.qmodel, True)
            self.qmodel.train(self.qmodel.training)  # one mode for every submodule, as calibrate() leaves it
            return
        started = time.perf_counter()
        calibrate(self.qmodel, self._calibration(), fit_on=self.qconfig.fit_on, device=self.device)
        rank_zero_info(f"calibrated {self.hparams.model_name} on {self._calibration_images()} images "
                       f"in {time.perf_counter() - started:.1f} s")

    @torch.no_grad()
    def build_evaluator(self) -> SuffixEvaluator:
        """This process's share of the calibration batches (round robin) with their teacher logits, as an evaluator
        whose fitness is summed over all processes, so every rank sees the whole calibration set's."""
        rank, world = self.global_rank, self.trainer.world_size
        run_checks.check_calibration_shards(len(self._calibration()), world)
        shard = [b.to(self.device) for b in self._calibration()[rank::world]]
        teachers = fp_teachers(self.qmodel, shard, keep_int_norm=self.hparams.teacher == "int_ln")
        reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
        self.teacher_id = run_checks.teacher_id(teachers, self._calibration_images(), reduce, self.device)
        return SuffixEvaluator(self.qmodel, self.blocks, shard, teachers, self.fitness_fn, self.device,
                               None if world == 1 else reduce)
