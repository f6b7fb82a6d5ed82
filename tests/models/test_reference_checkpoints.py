"""The shipped reference models are what checkpoints/README.md says: each loads and scores its recorded FP top-1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evolq_pl.data import FashionMNISTDataModule
from evolq_pl.models import create_quantized_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import quantization_disabled

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.mark.parametrize("name", ["vit12s_fmnist.pth", "swin_fmnist.pth", "resnet_fmnist.pth"])
@torch.no_grad()
def test_shipped_vit_scores_its_recorded_fp_top1_on_the_full_test_set(name):
    ckpt = CHECKPOINTS / name
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["meta"]
    assert {"command", "seed", "fp_top1"} <= set(meta)  # how it was made travels with the file
    model = create_quantized_model(meta["timm_name"], QuantConfig(), checkpoint_path=str(ckpt)).eval()
    data = FashionMNISTDataModule(calib_size=100, heldout_size=0, test_batch_size=1000,
                                  image_size=meta.get("image_size"))
    data.setup("test")
    hits = total = 0
    with quantization_disabled(model):
        for x, y in data.test_dataloader():
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 10_000
    assert 100.0 * hits / total == pytest.approx(meta["fp_top1"], abs=0.015)
