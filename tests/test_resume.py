"""A search stopped at any generation and resumed from last.ckpt ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

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


def module(ckpt: str, model_name: str = "vit_tiny_patch16_224", **options) -> EvolQModule:
    return EvolQModule(model_name=model_name, checkpoint_path=ckpt, w_bits=3, num_passes=1,
                       population_size=4, tournament_size=3, num_cycles=2, seed=3, **options)


def fit(tmp_path, ckpt: str, callbacks=(), ckpt_path=None, model_name: str = "vit_tiny_patch16_224",
        image_size: int | None = None, **options) -> tuple[EvolQModule, Trainer]:
    m = module(ckpt, model_name, **options)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, inference_mode=False, callbacks=[saver, *callbacks],
                      max_epochs=m.engine.num_visits)
    data = DemoDataModule(calib_size=64, heldout_size=0, batch_size=32, image_size=image_size,
                          generations_per_epoch=m.hparams.num_cycles)
    trainer.fit(m, datamodule=data, ckpt_path=ckpt_path)
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


def test_levit_resume_is_bitwise_identical(tmp_path):
    """The resume machinery is model-agnostic; the shipped LeViT reference (8 search blocks) proves it."""
    ckpt = str(Path(__file__).resolve().parents[1] / "checkpoints" / "levit_fmnist.pth")
    levit = {"model_name": "levit_128s", "image_size": 96}
    ref, _ = fit(tmp_path / "ref", ckpt, **levit)
    with pytest.raises(RuntimeError, match="pre-emption"):
        fit(tmp_path / "cut", ckpt, callbacks=[Crash(5)], **levit)
    resumed, trainer = fit(tmp_path / "cut", ckpt, ckpt_path=str(tmp_path / "cut" / "last.ckpt"), **levit)
    assert trainer.global_step == 8 * 2
    assert all(torch.equal(a, b) for a, b in zip(scales(resumed), scales(ref), strict=True))


def test_a_search_of_the_stem_and_head_resumes_bitwise_from_inside_the_stem_visit(tmp_path, tiny_vit_checkpoint):
    """The stem unit caches images, not block inputs; a stop inside its visit (the first) resumes all the same."""
    options = {"search_head": True, "search_stem": True, "strategy": "gradient"}
    ref, _ = fit(tmp_path / "ref", tiny_vit_checkpoint, **options)
    with pytest.raises(RuntimeError, match="pre-emption"):
        fit(tmp_path / "cut", tiny_vit_checkpoint, callbacks=[Crash(1)], **options)
    resumed, trainer = fit(tmp_path / "cut", tiny_vit_checkpoint, ckpt_path=str(tmp_path / "cut" / "last.ckpt"),
                           **options)
    assert trainer.global_step == (3 + 2) * 2
    assert all(torch.equal(a, b) for a, b in zip(scales(resumed), scales(ref), strict=True))
    assert resumed.current_fitness == ref.current_fitness


def test_resuming_against_another_calibration_set_or_teacher_is_refused(tmp_path, tiny_vit_checkpoint):
    """The settings may all match while the calibration images differ (another data folder): the teacher id, a
    digest of the teacher's logits, tells them apart once they exist, before any generation runs."""
    with pytest.raises(RuntimeError, match="pre-emption"):
        fit(tmp_path, tiny_vit_checkpoint, callbacks=[Crash(2)])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved["evolq"]["teacher_id"] = "the logits of other calibration images"
    torch.save(saved, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="checkpoint was searched with another calibration set or teacher "
                                         r"\(the logits of other calibration images vs .+\): resume with the same "
                                         "data and seed"):
        fit(tmp_path / "resumed", tiny_vit_checkpoint, ckpt_path=str(tmp_path / "other.ckpt"))
    assert not (tmp_path / "resumed" / "last.ckpt").exists()  # refused before a generation could checkpoint
