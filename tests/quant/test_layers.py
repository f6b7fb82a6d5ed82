"""Quantized layers: weight quantization and bias correction, integer LayerNorm, quantized softmax."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.layers import QConv2d, QIntLayerNorm, QLinear, QSoftmax, weight_cache_disabled
from evolq_pl.quant.quantizer import FakeQuantizer

UINT3, UINT4, UINT8 = BitType(3, False), BitType(4, False), BitType(8, False)


def _calibrated(layer):
    layer.calibrate_weight()
    layer.weight_quantizer.enabled = True
    return layer


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(24, 6)


@pytest.fixture
def conv() -> nn.Conv2d:
    torch.manual_seed(1)
    return nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1)


def test_qlinear_shares_parameters_and_equals_the_float_layer_when_off(linear):
    q = QLinear.from_float(linear, UINT4)
    assert q.weight is linear.weight and q.bias is linear.bias
    x = torch.randn(2, 7, 24)
    assert torch.equal(q(x), linear(x))
    q.calibrate_weight()  # calibrated but not enabled: still the float layer
    assert torch.equal(q(x), linear(x))


def test_qlinear_computes_with_each_row_on_its_own_grid(linear):
    q = _calibrated(QLinear.from_float(linear, UINT3))
    w_hat = q.quantized_weight()
    s, z = q.weight_quantizer.scale.unsqueeze(1), q.weight_quantizer.zero_point.unsqueeze(1)
    codes = w_hat / s + z
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)
    assert codes.min() > -0.01 and codes.max() < 7.01
    assert all(torch.round(codes[r]).unique().numel() <= 8 for r in range(6))
    x = torch.randn(3, 24)
    assert torch.allclose(q(x), TF.linear(x, w_hat, linear.bias))
    assert not torch.allclose(q(x), linear(x), atol=1e-4)


def test_qconv2d_equals_the_float_conv_when_off_and_quantizes_per_output_channel(conv):
    q = QConv2d.from_float(conv, UINT4)
    assert q.weight is conv.weight
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(q(x), conv(x))
    _calibrated(q)
    lo = conv.weight.detach().reshape(5, -1).min(1).values
    hi = conv.weight.detach().reshape(5, -1).max(1).values
    assert torch.allclose(q.weight_quantizer.scale, (hi - lo) / 15)
    w_hat = F.fake_quantize(conv.weight.detach(), q.weight_quantizer.scale, q.weight_quantizer.zero_point,
                            UINT4, dim=0)
    assert torch.allclose(q(x), TF.conv2d(x, w_hat, conv.bias, stride=2, padding=1), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_correction_restores_row_mean_and_unbiased_std(kind, linear, conv):
    layer = QLinear.from_float(linear, UINT3, bias_correction=True) if kind == "linear" else \
        QConv2d.from_float(conv, UINT3, bias_correction=True)
    _calibrated(layer)
    rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    corrected = layer.quantized_weight().reshape(rows.shape)
    assert torch.allclose(corrected.mean(1), rows.mean(1), atol=1e-5)
    assert torch.allclose(corrected.std(1), rows.std(1), atol=1e-5)
    plain = F.fake_quantize(layer.weight.detach(), layer.weight_quantizer.scale, layer.weight_quantizer.zero_point,
                            UINT3, dim=0).reshape(rows.shape)
    assert not torch.allclose(plain.mean(1), rows.mean(1), atol=1e-5)  # 3 bits leave something to correct


def test_weight_cache_is_reused_until_a_scale_is_written_in_place(linear):
    q = _calibrated(QLinear.from_float(linear, UINT4, bias_correction=True))
    first = q.quantized_weight()
    assert q.quantized_weight() is first
    x = torch.randn(4, 24)
    before = q(x)
    with torch.no_grad():
        q.weight_quantizer.scale[2] *= 1.5
    second = q.quantized_weight()
    assert second is not first
    assert not torch.equal(second[2], first[2]) and torch.equal(second[0], first[0])
    assert not torch.equal(q(x), before)


def test_weight_cache_disabled_restores_the_cache_also_when_the_body_raises(linear):
    q = _calibrated(QLinear.from_float(linear, UINT4))
    cached = q.quantized_weight()
    with pytest.raises(KeyError), weight_cache_disabled():
        assert q.quantized_weight() is not cached
        with weight_cache_disabled():
            assert q.quantized_weight() is not cached
        assert q.quantized_weight() is not cached  # the inner block gave back the outer one's choice
        raise KeyError("the body fails")
    assert q.quantized_weight() is cached


def test_weight_cache_follows_in_place_weight_updates(linear):
    q = _calibrated(QLinear.from_float(linear, UINT8))
    first = q.quantized_weight()
    with torch.no_grad():
        linear.weight.mul_(0.5)
    assert torch.allclose(q.quantized_weight(), first * 0.5, atol=q.weight_quantizer.scale.max().item())
    assert not torch.equal(q.quantized_weight(), first)


def _ptf_input_and_ln(seed: int, channels: int = 32):
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 1, channels)  # channel scales from 0.1 to 10, as residual streams have
    x = torch.randn(4, 16, channels, generator=g) * spread + torch.randn(channels, generator=g) * spread * 0.5
    in_q = FakeQuantizer(UINT8, "ptf", channels=channels, dim=-1)
    in_q.fit(x)
    in_q.enabled = True
    ln = QIntLayerNorm.from_float(nn.LayerNorm(channels, eps=1e-6))
    with torch.no_grad():
        ln.weight.copy_(1 + 0.2 * torch.randn(channels, generator=g))
        ln.bias.copy_(0.2 * torch.randn(channels, generator=g))
    return in_q(x), in_q, ln


@pytest.mark.parametrize("seed", [0, 1])
def test_integer_layernorm_matches_float_layernorm_within_the_output_step(seed):
    x_hat, in_q, ln = _ptf_input_and_ln(seed)
    assert in_q.scale.unique().numel() > 1  # the PTF factors differ between channels
    ref = TF.layer_norm(x_hat, ln.normalized_shape, ln.weight, ln.bias, ln.eps).detach()
    out_q = FakeQuantizer(UINT8, "minmax")
    out_q.fit(ref)
    ln.int_mode = True
    with torch.no_grad():
        out = ln(x_hat, in_q, out_q)
    step = out_q.scale.item()
    assert (out - ref).abs().max().item() <= 2 * step
    codes = out / step
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)  # the output lies on the output grid


def test_integer_layernorm_is_the_float_one_unless_switched_on():
    x_hat, in_q, ln = _ptf_input_and_ln(2)
    out_q = FakeQuantizer(UINT8, "minmax")
    out_q.fit(x_hat)
    ref = TF.layer_norm(x_hat, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    assert torch.equal(ln(x_hat, in_q, out_q), ref)
    ln.int_mode = True
    assert torch.equal(ln(x_hat), ref)  # without quantizers there is nothing to be integer about
    assert not torch.equal(ln(x_hat, in_q, out_q), ref)


def _scores(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 5, generator=g)
    x[..., 1] += 8.0  # peaked rows
    return torch.round(x / scale) * scale


def _pre_softmax_quantizer(x: torch.Tensor) -> FakeQuantizer:
    q = FakeQuantizer(UINT8, "minmax")
    q.fit(x)
    q.enabled = True
    return q


def _powers_of_two_or_zero(t: torch.Tensor) -> bool:
    nz = t[t != 0]
    return bool((nz > 0).all() and torch.equal(torch.log2(nz), torch.round(torch.log2(nz))))


def _log2_softmax(mode: str, seed: int) -> tuple[torch.Tensor, FakeQuantizer, QSoftmax]:
    """Quantized scores, their quantizer and a 4-bit log2 or LIS softmax switched on."""
    scores = _scores(seed, 0.05)
    in_q = _pre_softmax_quantizer(scores)
    sm = QSoftmax(mode, bits=4)
    sm.quantizer.enabled = True
    return in_q(scores), in_q, sm


@pytest.mark.parametrize("mode", ["log2", "lis"])
def test_log2_and_lis_softmax_output_powers_of_two_rows_near_one(mode):
    scores, in_q, sm = _log2_softmax(mode, 0)
    out = sm(scores, in_q)
    assert _powers_of_two_or_zero(out)
    assert ((out.sum(-1) - 1).abs() < 0.15).all()
    assert not torch.equal(out, scores.softmax(-1))


@pytest.mark.parametrize("mode", ["uniform", "log2", "lis"])
def test_softmax_with_quantization_off_is_the_plain_softmax(mode):
    scores = _scores(1, 0.05)
    in_q = _pre_softmax_quantizer(scores)
    sm = QSoftmax(mode, bits=8 if mode == "uniform" else 4)
    assert torch.equal(sm(scores, in_q), scores.softmax(-1))


def test_uniform_softmax_quantizes_probabilities_on_an_8bit_grid():
    scores = _scores(2, 0.05)
    sm = QSoftmax("uniform", bits=8, observer="minmax")
    sm.quantizer.fit(scores.softmax(-1))
    sm.quantizer.enabled = True
    out = sm(scores)
    codes = out / sm.quantizer.scale
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)
    assert (out - scores.softmax(-1)).abs().max() <= sm.quantizer.scale.item() / 2 + 1e-6


def test_unknown_softmax_mode_is_rejected():
    with pytest.raises(ValueError, match="uniform, log2 or lis"):
        QSoftmax("int", bits=8)


def test_integer_layernorm_passes_the_float_layernorms_gradient_and_keeps_its_value():
    """With autograd on, the integer LayerNorm's output is unchanged and its gradient is the float LayerNorm's:
    the integer statistics pass none, which left a search's fitness with a zero gradient in every scale."""
    x_hat, in_q, ln = _ptf_input_and_ln(3)
    out_q = FakeQuantizer(UINT8, "minmax")
    out_q.fit(TF.layer_norm(x_hat, ln.normalized_shape, ln.weight, ln.bias, ln.eps).detach())
    ln.int_mode = True
    with torch.no_grad():
        exact = ln(x_hat, in_q, out_q)
    x = x_hat.detach().clone().requires_grad_(True)
    out = ln(x, in_q, out_q)
    assert torch.equal(out.detach(), exact + 0.0)  # + 0.0: a -0 may turn +0
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    xf = x_hat.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(TF.layer_norm(xf, ln.normalized_shape, ln.weight, ln.bias, ln.eps), xf,
                                      grad_out)
    assert grad.abs().sum() > 0 and torch.equal(grad, expected)


@pytest.mark.parametrize("mode", ["log2", "lis"])
def test_log2_and_lis_softmax_pass_the_softmaxs_gradient_and_keep_their_value(mode):
    scores, in_q, sm = _log2_softmax(mode, 3)
    exact = sm(scores, in_q)
    x = scores.clone().requires_grad_(True)
    out = sm(x, in_q)
    assert torch.equal(out.detach(), exact)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    xf = scores.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(xf.softmax(-1), xf, grad_out)
    assert grad.abs().sum() > 0 and torch.equal(grad, expected)
