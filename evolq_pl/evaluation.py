"""Top-1/top-5 of the quantized (or FP) classifier: held-out validation during a search, and the test loop.

A mixin of :class:`~evolq_pl.module.EvolQModule`, kept apart so that the module reads as the search's adapter. It
needs ``self.qmodel``, ``hparams.eval_fp``/``temperature`` and ``ensure_calibrated()``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from evolq_pl.fitness import infonce
from evolq_pl.quant.modes import quantization_disabled


class ClassifierEvaluation(LightningModule):
    """Held-out top-1 and infoNCE for selection (never the test set); test top-1/top-5 into ``test_metrics``."""

    def init_metrics(self, num_classes: int) -> None:
        def accuracy(k: int) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")

        self.test_accuracy = MetricCollection({"top1": accuracy(1), "top5": accuracy(5)})
        self.val_top1 = accuracy(1)
        self.test_metrics: dict[str, float] = {}

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        self.qmodel.check_input(x)
        if not self.hparams.eval_fp:
            return self.qmodel(x)
        with quantization_disabled(self.qmodel):
            return self.qmodel(x)

    def on_validation_start(self) -> None:
        self.ensure_calibrated()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        with quantization_disabled(self.qmodel):
            teacher = self.qmodel(x)
        logits = self._logits(x)
        self.val_top1.update(logits, y)
        self.log("heldout/infonce", infonce(logits, teacher, self.hparams.temperature), on_epoch=True,
                 sync_dist=True, batch_size=len(x))

    def on_validation_epoch_end(self) -> None:
        self.log("heldout/top1", float(self.val_top1.compute()) * 100, sync_dist=False)
        self.val_top1.reset()

    def on_test_start(self) -> None:
        if not self.hparams.eval_fp:
            self.ensure_calibrated()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy.update(self._logits(x), y)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = {k: float(v) * 100 for k, v in self.test_accuracy.compute().items()}
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.items()})
        self.test_accuracy.reset()
