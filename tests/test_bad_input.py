"""Bad input the README's "Bad input" table lists and no other test file covers: each is refused with one line that
says how to fix it, before a search starts."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from evolq_pl.data import DemoDataModule, ImageNetDataModule
from evolq_pl.module import EvolQModule
from evolq_pl.testing import TINY_VIT_KWARGS


def module(ckpt: str, **overrides) -> EvolQModule:
    args = {"model_name": "vit_tiny_patch16_224", "checkpoint_path": ckpt, "w_bits": 3, "num_passes": 1,
            "population_size": 4, "tournament_size": 3, "num_cycles": 2}
    return EvolQModule(**{**args, **overrides})


def trainer(tmp_path: Path) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, inference_mode=False, max_epochs=3)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_no_local_weights_names_the_tag_and_both_ways_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError) as err:
        EvolQModule(model_name="deit_tiny_patch16_224.fb_in1k", pretrained=True)
    text = one_line(err)
    assert "no local weights for 'deit_tiny_patch16_224.fb_in1k'" in text
    assert "copy its cache (HF_HOME)" in text and "--model.checkpoint_path FILE" in text


def test_missing_corrupt_nan_or_mismatched_weight_files_are_refused(tmp_path, tiny_vit_checkpoint):
    with pytest.raises(FileNotFoundError, match=r"absent\.pth' does not exist: give the path of a timm weight file"):
        module(str(tmp_path / "absent.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read weights from .*corrupt\.pth' \(corrupt or not a PyTorch"):
        module(str(corrupt))
    saved = torch.load(tiny_vit_checkpoint, weights_only=True)
    no_tensors = tmp_path / "no_tensors.pth"
    torch.save({"state_dict": {"a": 1}}, no_tensors)
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        module(str(no_tensors))
    nan = tmp_path / "nan.pth"
    saved["state_dict"]["head.weight"][0, 0] = float("nan")
    torch.save(saved, nan)
    with pytest.raises(ValueError, match=r"hold NaN or inf in 'head.weight': the weight file is corrupt") as err:
        module(str(nan))
    one_line(err)
    for kwargs in ({"depth": 4}, {"embed_dim": 96, "num_heads": 3}):  # the file's blocks / widths do not fit
        with pytest.raises(ValueError, match=r"do not fit vit_tiny_patch16_224 .*\(check model_name and "
                                             r"model_kwargs\)") as err:
            module(tiny_vit_checkpoint, model_kwargs={**TINY_VIT_KWARGS, **kwargs})
        one_line(err)


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_images_of_another_size_than_the_model_are_refused(stage, tmp_path, tiny_vit_checkpoint):
    """32 px images through a ViT built for 28 px with 7 px patches would silently lose their last 4 pixels."""
    mod = module(tiny_vit_checkpoint, eval_fp=stage == "test")
    data = DemoDataModule(calib_size=16, heldout_size=0, batch_size=16, test_batch_size=500, image_size=32,
                          generations_per_epoch=2)
    with pytest.raises(ValueError, match=r"images of 1x32x32 \(channels x height x width\) do not fit "
                                         r"vit_tiny_patch16_224, built for 1x28x28: give the data module") as err:
        getattr(trainer(tmp_path), stage)(mod, datamodule=data)
    one_line(err)


def _image_tree(root: Path, train: tuple[str, ...], val: tuple[str, ...]) -> Path:
    for split, classes in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        for c in classes:
            (root / split / c).mkdir()
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / split / c / "0.png")
    return root


def _imagenet(root: Path) -> ImageNetDataModule:
    return ImageNetDataModule(str(root), input_size=(1, 8, 8), interpolation="bilinear", crop_pct=1.0, mean=(0.5,),
                              std=(0.5,), calib_size=1, batch_size=1)


def test_an_imagenet_tree_without_class_folders_is_refused(tmp_path):
    root = _image_tree(tmp_path / "flat", (), ())
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "loose.png")  # images, but no class folders
    with pytest.raises(ValueError, match=r"train holds no class folders; expected root/train/<class>/<image>") as err:
        _imagenet(root).setup("fit")
    one_line(err)


def test_an_imagenet_val_with_other_classes_than_train_is_refused(tmp_path):
    root = _image_tree(tmp_path / "tree", ("n01", "n02"), ("n01", "n03"))
    data = _imagenet(root)
    data.setup("fit")  # calibration reads only train
    with pytest.raises(ValueError, match=r"val has other class folders than train \(e.g. \['n02', 'n03'\]\); both "
                                         "splits need the same classes") as err:
        data.setup("test")
    one_line(err)
