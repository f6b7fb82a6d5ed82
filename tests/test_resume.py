"""A search stopped at any generation and resumed from last.ckpt ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from evolq_pl.data import DemoDataModule
from evolq_pl.module import EvolQModule

STEPS = 3 * 2  # 3 blocks x 2 generations, one pass


class Crash(Callback):
    """Stops the run like a pre-emption: before generation ``at`` starts, after the previous checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated pre-emption")


def module(ckpt: str) -> EvolQModule:
    return EvolQModule(model_name="vit_tiny_patch16_224", checkpoint_path=ckpt, w_bits=3, num_passes=1,
                       population_size=4, tournament_size=3, num_cycles=2, seed=3)


def fit(tmp_path, ckpt: str, callbacks=(), ckpt_path=None) -> tuple[EvolQModule, Trainer]:
    m = module(ckpt)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, inference_mode=False, callbacks=[saver, *callbacks])
    trainer.fit(m, datamodule=DemoDataModule(calib_size=64, heldout_size=0, batch_size=32), ckpt_path=ckpt_path)
    return m, trainer


def scales(m: EvolQModule) -> list[torch.Tensor]:
    return [layer.weight_quantizer.scale.clone() for b in m.blocks for layer in b.layers]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_vit_checkpoint):
    m, trainer = fit(tmp_path_factory.mktemp("uninterrupted"), tiny_vit_checkpoint)
    assert trainer.global_step == STEPS
    return scales(m), m.current_fitness


@pytest.mark.parametrize("stop_at", [1, 2, 5])
def test_resume_after_a_stop_is_bitwise_identical(tmp_path, tiny_vit_checkpoint, reference, stop_at):
    with pytest.raises(RuntimeError, match="pre-emption"):
        fit(tmp_path, tiny_vit_checkpoint, callbacks=[Crash(stop_at)])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == stop_at  # at most the interrupted generation is redone
    resumed, trainer = fit(tmp_path, tiny_vit_checkpoint, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == STEPS
    ref_scales, ref_fitness = reference
    assert all(torch.equal(a, b) for a, b in zip(scales(resumed), ref_scales, strict=True))
    assert resumed.current_fitness == ref_fitness
