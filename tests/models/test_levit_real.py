"""The shipped LeViT-style reference (trained on Fashion-MNIST): W8A8 keeps FP accuracy, and cli.py searches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli import cli_main
from evolq_pl.data import DemoDataModule
from evolq_pl.models import create_quantized_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, quantization_disabled

CKPT = str(Path(__file__).resolve().parents[2] / "checkpoints" / "levit_fmnist.pth")


@torch.no_grad()
def top1(model, loader) -> float:
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / total


def test_w8a8_levit_is_within_one_point_of_fp():
    data = DemoDataModule(calib_size=200, heldout_size=0, batch_size=100, test_batch_size=500, image_size=96)
    data.setup("test")
    model = create_quantized_model("levit_128s", QuantConfig(w_bits=8), checkpoint_path=CKPT)
    calibrate(model, data.calib_dataloader())
    with quantization_disabled(model):
        fp = top1(model, data.test_dataloader())
    w8 = top1(model, data.test_dataloader())
    assert fp > 80.0
    assert abs(fp - w8) <= 1.0


@pytest.mark.slow
def test_levit_search_runs_through_cli_fit_and_test(tmp_path):
    args = ["--model.model_name", "levit_128s", "--model.checkpoint_path", CKPT, "--model.w_bits", "4",
            "--model.num_passes", "1", "--model.population_size", "3", "--model.tournament_size", "2",
            "--model.num_cycles", "1", "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "32",
            "--data.heldout_size", "0", "--data.batch_size", "32", "--data.test_batch_size", "500",
            "--data.image_size", "96", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    fit = cli_main(["fit", *args, "--trainer.logger.init_args.version", "fit"])
    assert fit.trainer.global_step == 8  # one generation per attention block: depths (2, 2, 2) + 2 subsampling
    last = tmp_path / "evolq" / "fit" / "checkpoints" / "last.ckpt"
    cli_main(["test", *args, "--trainer.logger.init_args.version", "test", "--ckpt_path", str(last)])
    results = json.loads((tmp_path / "evolq" / "test" / "test_results.json").read_text())
    assert results["model"] == "levit_128s" and results["top1"] > 50.0
