"""QuantLevit on tiny timm LeViTs: BN folding, the reference tensor map (§1.9) and its faithful variant, suffix
evaluation, calibration, the search blocks of the paper's models and the Lightning module's schedule."""

import copy
import io

import pytest
import timm
import torch
from timm.models.levit import ConvNorm, LinearNorm, NormLinear
from torch import nn

from evolq_pl.models import create_quantized_model
from evolq_pl.models.levit import QuantLevit
from evolq_pl.module import EvolQModule
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import calibrate, quantization_disabled, set_quantized
from evolq_pl.quant.quantizer import FakeQuantizer

NAME = "levit_128s"
# 96 px: 6x6 tokens, then 3x3, then 2x2. At 64 px the last stage has one token, whose softmax is the constant 1.
TINY = {"img_size": 96, "embed_dim": (32, 48, 64), "key_dim": 8, "num_heads": (2, 3, 4), "num_classes": 10}
DEPTH = (1, 1, 2)
UNITS = ["stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.2.downsample",
         "stages.2.blocks.0", "stages.2.blocks.1"]


@torch.no_grad()
def _timm(seed: int = 0, distilled: bool = True, **kwargs) -> nn.Module:
    """A tiny LeViT whose BatchNorms, attention biases and residual branches all matter.

    timm's init zeroes the BN gain of every proj/fc2 (residual branches add nothing), zeroes the attention biases
    and leaves BN statistics at (0, 1), which would make folding and the bias path untestable.
    """
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, distilled=distilled, depth=DEPTH, **{**TINY, **kwargs})
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.normal_(1, 0.3)
            m.bias.normal_(0, 0.3)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
        elif isinstance(m, nn.Linear | nn.Conv2d):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5)
        if hasattr(m, "attention_biases"):
            m.attention_biases.normal_(0, 1)
    return model.eval()


def _images(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 96, 96, generator=torch.Generator().manual_seed(seed))


def _calibrated(seed: int = 0, **cfg) -> tuple[nn.Module, QuantLevit]:
    model = _timm(seed)
    qmodel = QuantLevit(model, QuantConfig(**cfg), NAME).eval()
    calibrate(qmodel, [_images(10, 8), _images(11, 8)])
    return model, qmodel


@pytest.fixture(scope="module")
def calibrated_w8() -> tuple[nn.Module, QuantLevit]:
    return _calibrated(w_bits=8)


@pytest.mark.parametrize("distilled", [True, False])
@torch.no_grad()
def test_batchnorm_folding_and_quantization_off_reproduce_timm_logits(distilled):
    model = _timm(distilled=distilled)
    qmodel = QuantLevit(model, QuantConfig(), NAME).eval()
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in qmodel.modules())
    x = _images(0)
    fp = model(x)
    assert fp.std().item() > 0.5  # a non-degenerate model, so the bound below means something
    assert (qmodel(x) - fp).abs().max().item() <= 1e-4


def test_every_linear_and_conv_is_quantized_once_per_timm_conv_or_linear_norm():
    model = _timm()
    n_fused = sum(isinstance(m, ConvNorm | LinearNorm | NormLinear) for m in model.modules())
    qmodel = QuantLevit(model, QuantConfig(), NAME)
    layers = [m for m in qmodel.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(isinstance(m, QLinear | QConv2d) for m in layers)
    assert len(layers) == n_fused == 4 + 2 + 4 * 4 + 2 * 5  # stem, two heads, 4 blocks, 2 downsamples
    assert qmodel.head_dist is not None and qmodel.num_classes == 10
    biases = {id(m.attention_biases) for m in model.modules() if hasattr(m, "attention_biases")}
    assert {id(p) for n, p in qmodel.named_parameters() if n.endswith("attention_biases")} == biases


def _attention_tensors(attn, x: torch.Tensor, prefix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every tensor the reference quantizes inside a timm Attention/AttentionDownsample (BN unfused)."""
    b, n, _ = x.shape
    if hasattr(attn, "qkv"):
        q, k, v = attn.qkv(x).view(b, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], 3)
    else:
        k, v = attn.kv(x).view(b, n, attn.num_heads, -1).split([attn.key_dim, attn.val_dim], 3)
        q = attn.q(x).view(b, -1, attn.num_heads, attn.key_dim)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = q @ k.transpose(-2, -1)
    biased = scores * attn.scale + attn.attention_biases[:, attn.attention_bias_idxs]
    soft = biased.softmax(-1)
    attn_v = (soft @ v).transpose(1, 2).reshape(b, q.shape[2], attn.val_attn_dim)
    act = attn.proj.act(attn_v)
    out = attn.proj.ln(act)
    t = {"q_q": q, "q_k": k, "q_v": v, "q_scores": scores, "q_biased": biased, "softmax.quantizer": soft,
         "q_attn_v": attn_v, "q_act": act, "q_proj": out}
    return {f"{prefix}.{k}": v for k, v in t.items()}, out


def _mlp_tensors(mlp, x: torch.Tensor, prefix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    fc1 = mlp.ln1(x)
    act = mlp.act(fc1)
    fc2 = mlp.ln2(act)
    return {f"{prefix}.q_fc1": fc1, f"{prefix}.q_act": act, f"{prefix}.q_fc2": fc2}, fc2


def _reference_tensors(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantizer name -> the tensor of the reference's LeViT map (§1.9) it must see, from timm's own modules."""
    t = {"q_input": x}
    h = x
    for name, m in model.stem.named_children():
        h = m(h)
        t[f"stem.q_{name}"] = h
    t["q_embed"] = h
    h = h.flatten(2).transpose(1, 2)
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            p = f"stages.{s}.downsample"
            extra, h = _attention_tensors(stage.downsample.attn_downsample, h, f"{p}.attn_downsample")
            t.update(extra)
            extra, y = _mlp_tensors(stage.downsample.mlp, h, f"{p}.mlp")
            t.update(extra)
            h = t[f"{p}.q_out"] = h + y
        for j, block in enumerate(stage.blocks):
            p = f"stages.{s}.blocks.{j}"
            extra, y = _attention_tensors(block.attn, h, f"{p}.attn")
            t.update(extra)
            h = t[f"{p}.q_res1"] = h + y
            extra, y = _mlp_tensors(block.mlp, h, f"{p}.mlp")
            t.update(extra)
            h = t[f"{p}.q_out"] = h + y
    t["q_post"] = h
    t["q_mean"] = pooled = h.mean(1)
    t["q_head"], t["q_head_dist"] = model.head(pooled), model.head_dist(pooled)
    t["q_logits"] = model(x)
    return t


def _activation_quantizers(qmodel: nn.Module) -> dict[str, FakeQuantizer]:
    return {n: m for n, m in qmodel.named_modules()
            if isinstance(m, FakeQuantizer) and not n.endswith("weight_quantizer")}


@torch.no_grad()
def test_activation_quantizers_sit_on_the_reference_tensor_map():
    model = _timm()
    qmodel = QuantLevit(model, QuantConfig(), NAME).eval()
    seen = {}
    for name, m in _activation_quantizers(qmodel).items():
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    x = _images(2)
    qmodel(x)
    expected = _reference_tensors(model, x)
    assert set(seen) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(seen[name], tensor, atol=1e-4, rtol=1e-4), name

    rows = {r["tensor"]: r for r in qmodel.quant_map() if r["kind"] == "activation"}
    ptf = {n for n in rows if n.startswith("stem.q_") or n.endswith(("q_res1", "q_out"))}
    assert len(ptf) == 7 + 4 * 2 + 2  # stem convs and activations, block sums, downsample MLP sums
    for name, row in rows.items():
        if name in ptf:
            dim = "channel(dim=1)" if name.startswith("stem.") else "channel(dim=-1)"
            assert (row["observer"], row["granularity"]) == ("ptf", dim), name
        else:
            assert (row["observer"], row["granularity"]) == ("omse", "tensor"), name
    weights = [r for r in qmodel.quant_map() if r["kind"] == "weight"]
    assert all(r["bits"] == "uint4" and r["bias_correction"] == "yes" for r in weights)  # stem and heads too


def test_faithful_leaves_unquantized_exactly_what_the_original_does():
    default = set(_activation_quantizers(QuantLevit(_timm(), QuantConfig(), NAME)))
    faithful = set(_activation_quantizers(QuantLevit(_timm(), QuantConfig(faithful=True), NAME)))
    blocks = [u for u in UNITS if "blocks" in u]
    quirk18 = {"q_input"} | {f"{u}.attn.q_act" for u in blocks} | {f"{u}.mlp.q_fc2" for u in UNITS}
    assert faithful <= default and default - faithful == quirk18
    assert {f"{u}.attn_downsample.q_act" for u in UNITS if "downsample" in u} <= faithful  # quantized there
    explicit = set(_activation_quantizers(QuantLevit(_timm(), QuantConfig(faithful=True, quantize_input=True), NAME)))
    assert explicit - faithful == {"q_input"}


@pytest.mark.parametrize("softmax", ["uniform", "lis"])
@torch.no_grad()
def test_suffix_evaluation_equals_the_full_forward_for_every_search_block(softmax):
    _, qmodel = _calibrated(softmax=softmax, softmax_bits=8 if softmax == "uniform" else 4)
    x = _images(3)
    full = qmodel(x)
    assert len(qmodel.search_blocks()) == len(UNITS)
    for i in range(len(UNITS) + 1):
        assert torch.equal(qmodel.forward_from(i, qmodel.forward_to(i, x)), full), i


@torch.no_grad()
def test_w8a8_calibration_gives_logits_close_to_fp_and_fp_mode_is_exact(calibrated_w8):
    model, qmodel = calibrated_w8
    x = _images(4, 8)
    fp, quantized = model(x), qmodel(x)
    err = (quantized - fp).abs()
    assert err.max().item() > 1e-3  # quantization is on
    assert err.mean().item() < 0.05 * fp.std().item()
    assert (quantized.argmax(1) == fp.argmax(1)).float().mean().item() >= 0.75
    with quantization_disabled(qmodel):
        assert (qmodel(x) - fp).abs().max().item() <= 1e-4
    assert torch.equal(qmodel(x), quantized)


@torch.no_grad()
def test_attention_biases_are_read_at_each_forward_and_follow_dtype(calibrated_w8):
    model, qmodel = copy.deepcopy(calibrated_w8)
    x = _images(5)
    with quantization_disabled(qmodel):
        qmodel(x)  # a forward before the write: nothing may be cached from it
        for m in model.modules():
            if hasattr(m, "attention_biases"):
                m.attention_biases.mul_(-1.5)  # shared with the quantized model
        model.eval()  # drops timm's own per-device cache
        assert (qmodel(x) - model(x)).abs().max().item() <= 1e-4
        qmodel.double()
        assert qmodel.stages[0].blocks[0].attn.attention_bias().dtype == torch.float64
        assert (qmodel(x.double()) - model.double()(x.double())).abs().max().item() <= 1e-5


@torch.no_grad()
def test_calibrated_state_dict_loads_into_a_fresh_model_with_identical_logits(calibrated_w8):
    _, qmodel = calibrated_w8
    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    buffer.seek(0)
    fresh = QuantLevit(_timm(), QuantConfig(w_bits=8), NAME).eval()
    with pytest.raises(RuntimeError, match="not calibrated"):
        set_quantized(fresh, True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    set_quantized(fresh, True)
    x = _images(6)
    assert torch.equal(fresh(x), qmodel(x))


@pytest.mark.parametrize(("name", "num_blocks"), [("levit_128s", 11), ("levit_128", 14)])
def test_paper_models_have_the_reference_number_of_search_blocks(name, num_blocks):
    qmodel = create_quantized_model(f"{name}.fb_dist_in1k", QuantConfig(w_bits=3), pretrained=False)
    assert isinstance(qmodel, QuantLevit) and qmodel.num_classes == 1000
    blocks = qmodel.search_blocks()
    assert len(blocks) == num_blocks
    first_stage = 2 if name == "levit_128s" else 4
    assert [b.name for b in blocks[first_stage:first_stage + 2]] == ["stages.1.downsample", "stages.1.blocks.0"]
    down = qmodel.stages[1].downsample.attn_downsample
    assert blocks[first_stage].layers == (down.kv, down.query, down.proj)
    attn = qmodel.stages[0].blocks[0].attn
    assert blocks[0].layers == (attn.qkv, attn.proj) and blocks[0].bits == 3
    mlp = qmodel.stages[0].blocks[0].mlp
    assert qmodel.search_blocks(include_mlp=True)[0].layers == (mlp.fc1, mlp.fc2, attn.qkv, attn.proj)


def test_lightning_module_schedules_every_levit_attention_block():
    module = EvolQModule(model_name=NAME, pretrained=False, model_kwargs=TINY, num_passes=2, w_bits=8)
    assert len(module.blocks) == 11
    assert module.engine.schedule == list(range(10, -1, -1)) * 2
    assert module.engine.eps == [1e-4] * 11
    assert module.test_accuracy["top1"].num_classes == 10


@pytest.mark.parametrize(("name", "kwargs"), [("levit_conv_128s", {}), (NAME, {"global_pool": ""})])
def test_unsupported_variants_are_rejected_with_a_reason(name, kwargs):
    model = timm.create_model(name, pretrained=False, **{**TINY, **kwargs}).eval()
    with pytest.raises(ValueError, match="unsupported Levit variant"):
        QuantLevit(model, QuantConfig(), name)
