"""QuantViT on tiny timm ViT/DeiT models: FP equivalence, the reference tensor map, suffix evaluation,
FP/teacher modes, the weight cache and checkpoints."""

import copy
import io

import pytest
import torch
from torch import nn

from evolq_pl.models.vit import QuantViT
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import calibrate, quantization_disabled, set_quantized
from evolq_pl.quant.quantizer import FakeQuantizer
from evolq_pl.testing import unit_gain_vit

DEIT, VIT = "deit_tiny_patch16_224", "vit_tiny_patch16_224"
DEPTH = 2


def _timm(name: str = DEIT, seed: int = 0, **kwargs) -> nn.Module:
    return unit_gain_vit(name, seed, depth=DEPTH, **kwargs)


def _images(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _calibrated(name: str = DEIT, seed: int = 0, **cfg) -> tuple[nn.Module, QuantViT]:
    model = _timm(name, seed)
    qmodel = QuantViT(model, QuantConfig(**cfg), name).eval()
    calibrate(qmodel, [_images(10), _images(11)])
    return model, qmodel


@pytest.fixture(scope="module")
def calibrated_deit() -> tuple[nn.Module, QuantViT]:
    return _calibrated()


@pytest.mark.parametrize("name", [DEIT, VIT])
@torch.no_grad()
def test_quantization_off_reproduces_timm_logits(name):
    model = _timm(name)
    qmodel = QuantViT(model, QuantConfig(), name).eval()
    x = _images(0)
    assert (qmodel(x) - model(x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_quantization_disabled_is_fp_but_the_original_teacher_keeps_integer_layernorm(calibrated_deit):
    model, qmodel = calibrated_deit
    x = _images(1)
    fp = model(x)
    quantized = qmodel(x)
    assert (quantized - fp).abs().max().item() > 1e-3
    assert (quantized - fp).abs().mean().item() < 0.25 * fp.std().item()  # quantized, not broken
    assert not torch.equal(quantized[0], quantized[1])  # the images still make a difference
    with quantization_disabled(qmodel):
        assert (qmodel(x) - fp).abs().max().item() <= 1e-5
    with quantization_disabled(qmodel, keep_int_norm=True):
        teacher = qmodel(x)
    assert (teacher - fp).abs().max().item() > 1e-3
    assert torch.equal(qmodel(x), quantized)  # back in quantized mode


def test_every_linear_and_conv_of_the_timm_model_is_quantized():
    model = _timm()
    n_float = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules())
    qmodel = QuantViT(model, QuantConfig(), DEIT)
    layers = [m for m in qmodel.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(isinstance(m, QLinear | QConv2d) for m in layers)
    assert len(layers) == n_float == 2 + 4 * DEPTH  # patch embedding, head, qkv/proj/fc1/fc2 per block
    weights = {id(p) for p in model.parameters()}
    assert all(id(m.weight) in weights for m in layers)  # shared with timm, not copied


# quantizer input -> the tensor of the reference map (§1.8) it must see, from timm's own modules
BLOCK_MAP = {
    "q_ln1": "ln1", "attn.q_qkv": "qkv", "attn.q_scores": "scores", "attn.softmax.quantizer": "softmax",
    "attn.q_attn_v": "attn_v", "attn.q_proj": "proj", "q_res1": "residual1", "q_ln2": "ln2",
    "q_fc1": "gelu", "q_fc2": "fc2", "q_out": "block_out",
}
PTF_TENSORS = {"q_res1", "q_out"}


def _timm_block_tensors(block, x: torch.Tensor) -> dict[str, torch.Tensor]:
    b, n, c = x.shape
    attn = block.attn
    t = {"ln1": block.norm1(x)}
    t["qkv"] = attn.qkv(t["ln1"])
    q, k, v = t["qkv"].reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    t["scores"] = (q * attn.scale) @ k.transpose(-2, -1)
    t["softmax"] = t["scores"].softmax(-1)
    t["attn_v"] = (t["softmax"] @ v).transpose(1, 2).reshape(b, n, c)
    t["proj"] = attn.proj(t["attn_v"])
    t["residual1"] = x + t["proj"]
    t["ln2"] = block.norm2(t["residual1"])
    t["gelu"] = block.mlp.act(block.mlp.fc1(t["ln2"]))
    t["fc2"] = block.mlp.fc2(t["gelu"])
    t["block_out"] = t["residual1"] + t["fc2"]
    return t


@torch.no_grad()
def test_activation_quantizers_sit_on_the_reference_tensor_map():
    model = _timm()
    qmodel = QuantViT(model, QuantConfig(), DEIT).eval()
    seen = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, FakeQuantizer) and not name.endswith("weight_quantizer"):
            m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    x = _images(2)
    logits = qmodel(x)

    tokens = model.patch_embed(x)
    embedded = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    expected = {"q_input": x, "q_patch": tokens, "q_embed": embedded, "q_pos": model.pos_embed,
                "q_block_in": embedded + model.pos_embed, "q_logits": logits}
    h = embedded + model.pos_embed
    for i, block in enumerate(model.blocks):
        tensors = _timm_block_tensors(block, h)
        expected.update({f"blocks.{i}.{q}": tensors[t] for q, t in BLOCK_MAP.items()})
        h = tensors["block_out"]
    expected["q_norm"] = model.norm(h)[:, 0]  # the final LN output quantizer sees the class token only
    assert set(seen) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(seen[name], tensor, atol=1e-5), name

    rows = {r["tensor"]: r for r in qmodel.quant_map() if r["kind"] == "activation"}
    for i in range(DEPTH):
        for q in BLOCK_MAP:
            row = rows[f"blocks.{i}.{q.removesuffix('.quantizer')}"]
            assert row["bits"] == "uint8"
            if q in PTF_TENSORS:
                assert row["observer"] == "ptf" and row["granularity"].startswith("channel")
            else:
                assert row["observer"] == "omse" and row["granularity"] == "tensor"
    assert rows["q_block_in"]["observer"] == "ptf"


def test_deit_quantizes_the_input_image_and_vit_does_not():
    assert isinstance(QuantViT(_timm(DEIT), QuantConfig(), DEIT).q_input, FakeQuantizer)
    assert QuantViT(_timm(VIT), QuantConfig(), f"{VIT}.augreg_in21k_ft_in1k").q_input is None
    assert isinstance(QuantViT(_timm(VIT), QuantConfig(quantize_input=True), VIT).q_input, FakeQuantizer)


@pytest.mark.parametrize("softmax", ["uniform", "lis"])
@torch.no_grad()
def test_suffix_evaluation_equals_the_full_forward_in_quantized_mode(softmax):
    _, qmodel = _calibrated(softmax=softmax, softmax_bits=8 if softmax == "uniform" else 4)
    x = _images(3)
    full = qmodel(x)
    for i in range(DEPTH + 1):
        assert torch.equal(qmodel.forward_from(i, qmodel.forward_to(i, x)), full), i


@torch.no_grad()
def test_weight_cache_is_reused_and_invalidated_by_in_place_scale_writes(calibrated_deit):
    _, qmodel = copy.deepcopy(calibrated_deit)
    x = _images(4)
    before = qmodel(x)
    qkv = qmodel.blocks[0].attn.qkv
    cached = qkv.quantized_weight()
    qmodel(x)
    assert qkv.quantized_weight() is cached  # nothing changed: nothing recomputed
    scale = qkv.weight_quantizer.scale
    original = scale.clone()
    scale.mul_(1.3)
    changed = qmodel(x)
    assert qkv.quantized_weight() is not cached
    assert not torch.equal(changed, before)
    scale.copy_(original)
    assert torch.equal(qmodel(x), before)


@torch.no_grad()
def test_calibrated_state_dict_loads_into_a_fresh_model_with_identical_logits(calibrated_deit):
    _, qmodel = calibrated_deit
    state = qmodel.state_dict()
    assert "blocks.0.attn.qkv.weight_quantizer.scale" in state
    assert "blocks.0.q_out.zero_point" in state and "q_logits.scale" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    fresh = QuantViT(_timm(seed=1), QuantConfig(), DEIT).eval()
    with pytest.raises(RuntimeError, match="not calibrated"):
        set_quantized(fresh, True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    set_quantized(fresh, True)
    x = _images(5)
    assert torch.equal(fresh(x), qmodel(x))


def test_search_blocks_are_the_attention_layers_of_each_block():
    qmodel = QuantViT(_timm(), QuantConfig(w_bits=3), DEIT)
    blocks = qmodel.search_blocks()
    assert [b.name for b in blocks] == [f"blocks.{i}" for i in range(DEPTH)]
    assert blocks[1].layers == (qmodel.blocks[1].attn.qkv, qmodel.blocks[1].attn.proj)
    assert blocks[0].bits == 3
    assert len(qmodel.search_blocks(include_mlp=True)[0].layers) == 4


@pytest.mark.parametrize("kwargs", [{"global_pool": "avg"}, {"reg_tokens": 1}])
def test_unsupported_variants_are_rejected_with_a_reason(kwargs):
    with pytest.raises(ValueError, match="unsupported VisionTransformer variant"):
        QuantViT(_timm(**kwargs), QuantConfig(), DEIT)


def test_calibration_under_inference_mode_matches_and_scale_writes_still_invalidate(calibrated_deit):
    _, reference = calibrated_deit
    _, qmodel = copy.deepcopy(calibrated_deit)
    x = _images(6)
    with torch.inference_mode():  # as Lightning's validate/test/predict run
        calibrate(qmodel, [_images(10), _images(11)])
        logits = qmodel(x)
        for key, value in reference.state_dict().items():
            assert torch.equal(qmodel.state_dict()[key], value), key
        assert torch.equal(logits, reference(x))
        qmodel.blocks[1].attn.proj.weight_quantizer.scale.mul_(1.3)
        assert not torch.equal(qmodel(x), logits)
