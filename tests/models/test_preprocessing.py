"""Evaluation preprocessing resolved from timm, with Evol-Q's DeiT/LeViT crop."""

from __future__ import annotations

import pytest

from evolq_pl.models.preprocessing import preprocessing_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def test_deit_tiny_uses_evolq_crop() -> None:
    pre = preprocessing_for("deit_tiny_patch16_224.fb_in1k")
    assert pre == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "crop_pct": 0.875,  # timm says 0.9; Evol-Q resizes to 256
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    assert preprocessing_for("deit_tiny_patch16_224") == pre


def test_vit_base_augreg_keeps_timm_values() -> None:
    pre = preprocessing_for("vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert pre["crop_pct"] == 0.9 and pre["interpolation"] == "bicubic"
    assert pre["mean"] == (0.5, 0.5, 0.5) and pre["std"] == (0.5, 0.5, 0.5)
    assert pre["input_size"] == (3, 224, 224)


def test_levit_128s_uses_evolq_crop() -> None:
    pre = preprocessing_for("levit_128s.fb_dist_in1k")
    assert pre["crop_pct"] == 0.875 and pre["mean"] == IMAGENET_MEAN and pre["std"] == IMAGENET_STD
    assert pre["input_size"] == (3, 224, 224) and pre["interpolation"] == "bicubic"


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"'no_such_vit' is unknown to timm .*timm\.list_models"):
        preprocessing_for("no_such_vit")
    with pytest.raises(
        ValueError, match=r"pretrained tag in 'deit_tiny_patch16_224\.nope' is unknown .*timm\.list_models"
    ):
        preprocessing_for("deit_tiny_patch16_224.nope")
