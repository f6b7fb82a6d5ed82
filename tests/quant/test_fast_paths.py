"""The in-place inference path (no autograd) gives the same bits as the reference formulas, everywhere the search
runs: fake quantization, integer LayerNorm, a whole quantized ViT in fp32 and under bf16 autocast; on the CPU, and
on a CUDA GPU where there is one (the ``device`` fixture)."""

import pytest
import torch
from torch import nn

from evolq_pl.models.vit import QAttention, QuantViT
from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.fused import same_bits
from evolq_pl.quant.layers import QLinear, int_layer_norm, weight_cache_disabled
from evolq_pl.quant.modes import calibrate
from evolq_pl.testing import unit_gain_vit


def _both(fn):
    with torch.no_grad():
        fast = fn()
        with F.reference_ops():
            ref = fn()
    return fast, ref


def fq_inputs(bt: BitType, dim: int | None, shape: tuple, zero: bool, seed: int, device: torch.device | str = "cpu"):
    """Activations with signed zeros, tiny and huge values (and a NaN), per-channel scales and zero points, and
    exact ties of round(x/s + z) on per-tensor grids: the cases where two formulas could round apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    flat[:8] = torch.tensor([-0.0, 0.0, float("nan"), -1e-30, 1e-30, -0.2, 0.25, 1e30])
    channels = 1 if dim is None else shape[dim]
    scale = torch.rand(channels, generator=g) * 0.1 + 0.01
    zp = torch.zeros(channels) if zero else torch.randint(bt.qmin, bt.qmax + 1, (channels,), generator=g).float()
    if dim is None:  # exact ties v = k + 1/2 of round(x/s + z)
        scale[0] = 0.5
        flat[8:12] = (torch.tensor([0.5, 1.5, 2.5, -0.5]) - zp[0]) * 0.5
    return x.to(device), scale.to(device), zp.to(device)


@pytest.mark.parametrize("bits,signed", [(8, False), (4, False), (3, True), (2, True)])
@pytest.mark.parametrize("dim,shape", [(None, (4, 50, 24)), (-1, (4, 50, 24)), (0, (24, 40)), (1, (3, 5, 7, 7))])
@pytest.mark.parametrize("zero", [False, True])
def test_inplace_fake_quantize_has_the_reference_bits(bits, signed, dim, shape, zero, device):
    bt = BitType(bits, signed)
    x, scale, zp = fq_inputs(bt, dim, shape, zero, seed=bits * 10 + len(shape), device=device)
    fast, ref = _both(lambda: F.fake_quantize(x, scale, zp, bt, dim))
    assert same_bits(fast, ref)


def test_inplace_path_is_only_taken_without_autograd():
    x = torch.randn(10, requires_grad=True)
    out = F.fake_quantize(x, torch.tensor([0.1]), torch.tensor([5.0]), BitType(4, False))
    out.sum().backward()  # the straight-through estimator still sees the graph
    assert x.grad is not None
    assert not F.inplace_ok(x)
    with torch.no_grad():
        assert F.inplace_ok(x)
        with F.reference_ops():
            assert not F.inplace_ok(x)


def test_pow2_int_is_exact_on_every_exponent_and_passes_nan():
    n = torch.cat([torch.arange(32.0), torch.tensor([float("nan")])])
    out = F.pow2_int(n)
    assert torch.equal(out[:32], torch.pow(2.0, n[:32])) and out[32].isnan()


def int_ln_inputs(seed: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(x, in_scale, out_scale, gamma, beta) of an integer LayerNorm on a PTF grid, with a negative, an underflowing
    and a zero gain and a constant (zero-variance) row."""
    g = torch.Generator().manual_seed(seed)
    channels = 48
    base = torch.rand(1, generator=g) * 0.05 + 0.005
    in_scale = base * 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()
    x = torch.round(torch.randn(3, 17, channels, generator=g) * 40) * in_scale
    gamma = 1 + 0.3 * torch.randn(channels, generator=g)
    gamma[:3] = torch.tensor([-0.7, 1e-30, 0.0])
    beta = 0.2 * torch.randn(channels, generator=g)
    x[0, 0] = x[0, 0, :1]
    return tuple(t.to(device) for t in (x, in_scale, torch.tensor([0.04]), gamma, beta))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inplace_int_layer_norm_has_the_reference_bits(seed, device):
    args = int_ln_inputs(seed, device)
    fast, ref = _both(lambda: int_layer_norm(*args))
    assert same_bits(fast, ref)


@torch.no_grad()
def _tiny_deit(seed: int = 0, device: torch.device | str = "cpu") -> QuantViT:
    model = unit_gain_vit("deit_tiny_patch16_224", seed, depth=2)
    qmodel = QuantViT(model, QuantConfig(w_bits=4), "deit_tiny_patch16_224").eval().to(device)
    calibrate(qmodel, [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(10)).to(device)])
    return qmodel


def tiny_deit_run(autocast: bool, device: torch.device | str = "cpu"):
    """A forward of a calibrated 2-block DeiT both ways the search runs it: (suffix from block 1, whole model)."""
    device = torch.device(device)
    qmodel = _tiny_deit(device=device)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return qmodel.forward_from(1, qmodel.forward_to(1, x)), qmodel(x)

    return run


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_quantized_vit_gives_the_reference_bits_in_fp32_and_under_bf16_autocast(autocast, chunked, monkeypatch,
                                                                                 device):
    run = tiny_deit_run(autocast, device)
    calls = []
    if chunked:  # 2 images of scores per chunk: the batch of 5 runs its attention in chunks of 2, 2 and 1
        monkeypatch.setattr(QAttention, "chunk_bytes", 2 * 3 * 17 * 17 * 4)
        attend = QAttention._attend
        monkeypatch.setattr(QAttention, "_attend", lambda self, qkv: calls.append(len(qkv)) or attend(self, qkv))
    (suffix, full), (suffix_ref, full_ref) = _both(run)
    assert same_bits(full, full_ref) and same_bits(suffix, suffix_ref)
    assert same_bits(suffix, full)
    if chunked and device.type == "cpu":  # 4 block forwards (prefix, suffix, whole model) in 3 chunks each
        assert calls == [2, 2, 1] * 4 + [5] * 4  # the reference path unchunked
    elif chunked:  # chunking is for CPU caches: a GPU runs every attention whole
        assert calls == [5] * 8


def test_bf16_weight_cast_is_cached_and_follows_scale_writes():
    torch.manual_seed(0)
    q = QLinear.from_float(nn.Linear(24, 6), BitType(4, False))
    q.calibrate_weight()
    q.weight_quantizer.enabled = True
    x = torch.randn(3, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = q.compute_params(x)[0]
        assert first.dtype == torch.bfloat16 and q.compute_params(x)[0] is first
        before = q(x)
        q.weight_quantizer.scale[1] *= 1.5
        second = q.compute_params(x)[0]
        assert second is not first and torch.equal(second, q.quantized_weight().to(torch.bfloat16))
        assert not torch.equal(q(x), before)
        with weight_cache_disabled():
            assert torch.equal(q(x), torch.nn.functional.linear(x, q.quantized_weight(), q.bias))


def test_weight_cache_disabled_requantizes_on_every_call_with_the_same_values():
    torch.manual_seed(0)
    q = QLinear.from_float(nn.Linear(24, 6), BitType(3, False), bias_correction=True)
    q.calibrate_weight()
    q.weight_quantizer.enabled = True
    cached = q.quantized_weight()
    with weight_cache_disabled():
        fresh = q.quantized_weight()
        assert fresh is not cached and fresh is not q.quantized_weight()
        assert torch.equal(fresh, cached)
    assert q.quantized_weight() is cached


@pytest.mark.parametrize("dim", [None, -1])
def test_fake_quantize_into_the_input_has_the_same_bits_and_falls_back_where_it_must(dim):
    bt = BitType(8, False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, 16, generator=g) * 2
    scale = torch.rand(1 if dim is None else 16, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, 256, scale.shape, generator=g).float()
    with torch.no_grad():
        expected = F.fake_quantize(x, scale, zp, bt, dim)
        buffer = x.clone()
        assert F.fake_quantize_(buffer, scale, zp, bt, dim) is buffer and same_bits(buffer, expected)
        strided = x.clone().transpose(0, 1)  # not contiguous: a fresh result, the input untouched
        before = strided.clone()
        assert same_bits(F.fake_quantize_(strided, scale, zp, bt, dim), expected.transpose(0, 1))
        assert same_bits(strided, before)
    leaf = x.clone().requires_grad_(True)  # autograd: the formula, the input untouched
    assert torch.equal(F.fake_quantize_(leaf, scale, zp, bt, dim).detach(), expected)
    assert torch.equal(leaf.detach(), x)


def test_quantized_forward_leaves_the_images_and_parameters_untouched():
    qmodel = _tiny_deit()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    images, params = x.clone(), {k: v.clone() for k, v in qmodel.state_dict().items()}
    with torch.no_grad():
        qmodel(x)
    assert torch.equal(x, images)
    assert all(torch.equal(v, params[k]) for k, v in qmodel.state_dict().items())
