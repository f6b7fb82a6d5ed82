"""With bf16-mixed, a block visit is prepared in the precision its candidates are scored in (Lightning autocasts
only training_step), so the children are compared with a baseline of the same precision, fresh or resumed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from evolq_pl.data import DemoDataModule
from evolq_pl.fitness import infonce
from evolq_pl.module import EvolQModule
from evolq_pl.quant.modes import calibrate, quantization_disabled


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_baseline_fitness_is_scored_in_the_training_precision(tmp_path, tiny_vit_checkpoint, precision):
    def module() -> EvolQModule:
        return EvolQModule(model_name="vit_tiny_patch16_224", checkpoint_path=tiny_vit_checkpoint, w_bits=3,
                           num_passes=1, population_size=3, tournament_size=2, num_cycles=1, seed=0)

    searched = module()
    data = DemoDataModule(calib_size=64, heldout_size=0, batch_size=32, generations_per_epoch=1)
    Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
            precision=precision, max_epochs=searched.engine.num_visits).fit(searched, datamodule=data)

    fresh = module()
    calibrate(fresh.qmodel, searched._calib)
    with torch.no_grad():
        with quantization_disabled(fresh.qmodel):
            teachers = [fresh.qmodel(x).float() for x in searched._calib]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            values = [infonce(fresh.qmodel(x), t) for x, t in zip(searched._calib, teachers, strict=True)]
    expected = float(torch.stack(values).double().sum()) / len(values)
    assert searched.baseline_fitness == pytest.approx(expected, rel=1e-12, abs=1e-12)
