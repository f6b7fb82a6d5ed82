"""Calibration on real images: W8A8 keeps FP accuracy, W2A8 visibly does not (the test can fail both ways)."""

from __future__ import annotations

import pytest
import torch

from evolq_pl.data import DemoDataModule
from evolq_pl.models import create_quantized_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, quantization_disabled


@pytest.fixture(scope="module")
def data():
    dm = DemoDataModule(calib_size=200, heldout_size=0, batch_size=100, test_batch_size=500)
    dm.setup("test")
    return dm


@torch.no_grad()
def top1(model, loader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def quantized_top1(checkpoint: str, data: DemoDataModule, w_bits: int) -> tuple[float, float]:
    model = create_quantized_model("vit_tiny_patch16_224", QuantConfig.from_preset("e2e", w_bits=w_bits),
                                   checkpoint_path=checkpoint)
    calibrate(model, data.calib_dataloader())
    with quantization_disabled(model):
        fp = top1(model, data.test_dataloader())
    return fp, top1(model, data.test_dataloader())


def test_w8a8_is_within_one_point_of_fp_and_w2a8_is_clearly_worse(tiny_vit_checkpoint, data):
    fp, w8 = quantized_top1(tiny_vit_checkpoint, data, 8)
    _, w2 = quantized_top1(tiny_vit_checkpoint, data, 2)
    print(f"FP {fp:.2f}  W8A8 {w8:.2f}  W2A8 {w2:.2f}")
    assert fp > 75.0  # the model really learned Fashion-MNIST
    assert abs(fp - w8) <= 1.0
    assert w2 < w8 - 1.5  # small ViTs are robust: W2 costs this one about 2 points (W8A8 78.55 -> W2A8 76.35)
