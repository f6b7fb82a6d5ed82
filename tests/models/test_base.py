"""The search units every family offers (QuantizedModel.search_blocks): the head and the stem join the blocks,
each unit rerun from its own start gives the full model's logits, with the MLPs they cover every weight-quantized
layer of a transformer, and ``joint`` makes them one unit."""

from __future__ import annotations

import pytest
import torch

from evolq_pl.models import create_quantized_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, weight_layers
from evolq_pl.testing import TINY_RESNET_KWARGS, TINY_VIT_KWARGS, TINY_VIT_NAME

# family -> (timm name, kwargs, input (channels, side))
FAMILIES = {
    "vit": (TINY_VIT_NAME, TINY_VIT_KWARGS, (1, 28)),
    "levit": ("levit_128s", {"depth": (1, 1, 1), "img_size": 64, "embed_dim": (32, 48, 64), "key_dim": 8,
                             "num_heads": (2, 3, 4), "num_classes": 10}, (3, 64)),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "embed_dim": 24, "depths": (2, 2),
                                              "num_heads": (2, 4), "window_size": 4, "num_classes": 10}, (3, 32)),
    "cnn": ("resnet18", TINY_RESNET_KWARGS, (3, 32)),
}


@torch.no_grad()
def _calibrated(family: str):
    name, kwargs, (chans, side) = FAMILIES[family]
    qmodel = create_quantized_model(name, QuantConfig(w_bits=3), pretrained=False, model_kwargs=kwargs).eval()
    images = [torch.randn(4, chans, side, side, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    calibrate(qmodel, images)
    return qmodel, images[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_the_head_and_stem_units_follow_the_blocks_and_rerun_to_the_full_logits(family):
    qmodel, x = _calibrated(family)
    blocks, units = qmodel.search_blocks(), qmodel.search_blocks(include_head=True, include_stem=True)
    assert units[:-2] == blocks and [u.name for u in units[-2:]] == ["head", "stem"]
    head, stem = units[-2:]
    assert qmodel.head in head.layers and head.start == len(blocks) and stem.start is None
    stem_names = {n for n, m in qmodel.named_modules() if any(m is layer for layer in stem.layers)}
    assert stem_names and all(n.split(".")[0] in ("stem", "patch_proj") for n in stem_names)
    full = qmodel(x)
    for unit in units:
        assert torch.equal(qmodel.suffix(unit.start, qmodel.prefix(unit.start, x)), full), unit.name


@pytest.mark.parametrize("family", ["vit", "levit"])
def test_with_the_mlps_and_the_ends_every_weight_of_a_transformer_is_searched(family):
    qmodel, _ = _calibrated(family)
    searched = {id(layer) for u in qmodel.search_blocks(True, True, True) for layer in u.layers}
    assert {name for name, layer in weight_layers(qmodel) if id(layer) not in searched} == set()


@pytest.mark.parametrize("stem", [False, True])
@torch.no_grad()
def test_a_joint_unit_holds_the_blocks_and_head_in_forward_order_and_the_stem_stays_its_own(stem):
    qmodel, x = _calibrated("levit")
    units = qmodel.search_blocks(True, True, stem)
    joint = qmodel.search_blocks(True, True, stem, joint=True)
    assert [u.name for u in joint] == ["all", *(["stem"] if stem else [])]
    assert joint[0].layers == tuple(layer for u in units[:len(units) - stem] for layer in u.layers)
    assert joint[0].start == 0 and joint[0].layers[-1] is qmodel.head_dist and joint[1:] == units[len(units) - stem:]
    assert torch.equal(qmodel.suffix(0, qmodel.prefix(0, x)), qmodel(x))
