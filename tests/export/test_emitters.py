"""Each ONNX emitter alone, run in ONNX Runtime against the PyTorch layer it writes: integer LayerNorm (extreme inputs
included), log-int-softmax, the log2 grid, floor(log2), activation Q/DQ, and Linear/Conv with bias correction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from evolq_pl.export.emitters import Emitter
from evolq_pl.export.graph import Graph, float_input
from evolq_pl.export.runtime import session
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.layers import QConv2d, QIntLayerNorm, QLinear, QSoftmax, int_layer_norm
from evolq_pl.quant.quantizer import FakeQuantizer

UINT8 = BitType(8, False)


def run(modules: nn.Module, emit, x: torch.Tensor, optimize: bool = False) -> np.ndarray:
    """Write ``emit(emitter, input_name) -> output_name`` into a graph, check it and run it on ``x``."""
    g = Graph()
    e = Emitter(g, modules)
    name = g.name("x")
    g.op("Identity", [emit(e, name)], "y")
    g.nodes[-1].output[0] = "y"
    proto = g.model([float_input(name, list(x.shape))], [float_input("y", [f"d{i}" for i in range(x.dim())])])
    onnx.checker.check_model(proto, full_check=True)
    return session(proto.SerializeToString(), optimize=optimize).run(None, {name: x.numpy()})[0]


def ptf_quantizer(channels: int, seed: int, alphas: torch.Tensor | None = None) -> FakeQuantizer:
    """A calibrated PTF quantizer: base scale times 2^α per channel, one shared zero point."""
    g = torch.Generator().manual_seed(seed)
    q = FakeQuantizer(UINT8, "ptf", channels=channels, dim=-1)
    alphas = torch.randint(0, 4, (channels,), generator=g) if alphas is None else alphas
    q.scale.copy_(0.01 * 2.0 ** alphas.float())
    q.zero_point.fill_(128)
    q.calibrated.fill_(True)
    q.enabled = True
    return q


def out_quantizer(scale: float, zero_point: float = 120) -> FakeQuantizer:
    q = FakeQuantizer(UINT8)
    q.scale.fill_(scale)
    q.zero_point.fill_(zero_point)
    q.calibrated.fill_(True)
    q.enabled = True
    return q


def layer_norm(channels: int, seed: int) -> QIntLayerNorm:
    torch.manual_seed(seed)
    ln = QIntLayerNorm(channels)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    ln.int_mode = True
    return ln


def on_grid(q: FakeQuantizer, codes: torch.Tensor) -> torch.Tensor:
    """Activations that are exactly the quantizer's grid values for integer ``codes``."""
    return (codes.float() - q.zero_point) * q.scale


def test_integer_layernorm_is_bitwise_the_layers_on_real_ptf_inputs():
    channels = 64
    in_q, out_q, ln = ptf_quantizer(channels, 0), out_quantizer(0.03), layer_norm(channels, 0)
    codes = torch.randint(60, 200, (8, 17, channels), generator=torch.Generator().manual_seed(1))
    x = on_grid(in_q, codes)
    with torch.no_grad():
        expected = ln(x, in_q, out_q).numpy()
    parts = nn.ModuleDict({"ln": ln, "in_q": in_q, "out_q": out_q})
    out = run(parts, lambda e, n: e.layer_norm(n, ln, in_q, out_q), x)
    assert np.array_equal(out, expected)
    assert np.array_equal(run(parts, lambda e, n: e.layer_norm(n, ln, in_q, out_q), x, optimize=True), expected)


@pytest.mark.parametrize("case", ["largest codes", "alternating extremes", "constant rows"])
def test_integer_layernorm_equals_pytorch_at_extreme_inputs(case):
    """ViT-Base width, every channel at α = 3 and |q - z| up to 255: C·Σx² reaches 2.5e12, far past int32, and the
    dyadic offset b reaches ~2^31·|β/s|; in float32 both stay finite and equal PyTorch's. A constant row (zero
    variance) gives ±inf in PyTorch's integer LayerNorm (std clamped to the smallest float, no eps), which the
    next quantizer saturates to its grid's end; the export gives the same."""
    channels = 768
    in_q = ptf_quantizer(channels, 0, alphas=torch.full((channels,), 3))
    in_q.zero_point.fill_(0 if case == "largest codes" else 128)
    out_q, ln = out_quantizer(0.02), layer_norm(channels, 1)
    g = torch.Generator().manual_seed(2)
    if case == "largest codes":  # all codes 255 except a few, so the variance is tiny and a = s/std huge
        codes = torch.full((4, 5, channels), 255)
        codes[:, :, :3] = 254
    elif case == "alternating extremes":
        codes = torch.where(torch.rand(4, 5, channels, generator=g) < 0.5, 0, 255)
    else:  # zero variance: std is clamped to the smallest normal float
        codes = torch.full((4, 5, channels), 255)
    x = on_grid(in_q, codes)
    with torch.no_grad():
        expected = int_layer_norm(x, in_q.scale, out_q.scale, ln.weight, ln.bias).numpy()
    out = run(nn.ModuleDict({"ln": ln}), lambda e, n: e.layer_norm(n, ln, in_q, out_q), x)
    assert np.isfinite(out).all() == np.isfinite(expected).all()
    if case != "constant rows":
        assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, expected)


def test_floor_log2_is_exact_at_and_around_powers_of_two():
    k = torch.arange(-126, 128, dtype=torch.float32)
    powers = torch.pow(2.0, k)
    x = torch.cat([powers, torch.nextafter(powers, torch.tensor(0.0)), torch.nextafter(powers, torch.tensor(np.inf)),
                   torch.rand(1000) * 1e3 + 1e-3])
    x = x[torch.isfinite(x) & (x > 0)]
    expected = np.floor(np.log2(x.double().numpy()))
    out = run(nn.Module(), lambda e, n: e.floor_log2(n, "f"), x)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("scale", [0.05, 0.3])
def test_log_int_softmax_equals_the_layers(scale):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-120, 120, (6, 2, 17, 17), generator=g).float()
    codes[0, 0] = 0.0  # a head whose rows are all equal
    codes[1, 0, :, 0] = 127.0  # one dominant key
    x = codes * scale
    sm = QSoftmax("lis", 4)
    sm.quantizer.enabled = True
    in_q = out_quantizer(scale, 0)
    with torch.no_grad():
        expected = sm(x, in_q).numpy()
    out = run(nn.ModuleDict({"sm": sm}), lambda e, n: e.softmax(n, sm, in_q), x)
    np.testing.assert_array_equal(out, expected)


def test_log2_softmax_grid_matches_the_layer_except_at_rounding_boundaries():
    x = torch.randn(8, 3, 17, 17, generator=torch.Generator().manual_seed(4)) * 3
    sm = QSoftmax("log2", 4)
    sm.quantizer.enabled = True
    with torch.no_grad():
        expected = sm(x).numpy()
    out = run(nn.ModuleDict({"sm": sm}), lambda e, n: e.softmax(n, sm, None), x)
    differ = out != expected
    assert differ.mean() < 1e-3
    ratio = out[differ] / np.maximum(expected[differ], 1e-30)
    assert np.all((np.isclose(ratio, 2.0) | np.isclose(ratio, 0.5)) | (out[differ] == 0) | (expected[differ] == 0))


@pytest.mark.parametrize("bits", [8, 5])
def test_activation_qdq_is_the_fake_quantizer_up_to_ties_and_stays_on_the_b_bit_grid(bits):
    q = FakeQuantizer(BitType(bits, False))
    q.scale.fill_(0.0371)
    q.zero_point.fill_(min(37, 2**bits - 1))
    q.calibrated.fill_(True)
    q.enabled = True
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(5)) * 5
    x[:1000] = (torch.arange(1000) - 500 + 0.5) * q.scale  # exact ties: round(x/s) + z and round(x/s + z) may part
    with torch.no_grad():
        expected = q(x.clone()).numpy()
    out = run(nn.ModuleDict({"q": q}), lambda e, n: e.quantize(n, q), x)
    codes = np.round(out / q.scale.item()) + q.zero_point.item()
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    steps = np.abs(out - expected) / q.scale.item()
    assert steps.max() <= 1 + 1e-5
    assert (steps[1000:] > 0).mean() < 1e-4  # away from exact ties: equal but for float addition's lost bits


@pytest.mark.parametrize("signed", [False, True])
def test_bias_corrected_linear_and_grouped_conv_match_the_layers(signed):
    torch.manual_seed(6)
    bt = BitType(3, signed)
    linear = QLinear.from_float(nn.Linear(40, 12), bt, bias_correction=True)
    conv = QConv2d.from_float(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), bt, bias_correction=True)
    for layer in (linear, conv):
        layer.calibrate_weight()
        layer.weight_quantizer.enabled = True
    parts = nn.ModuleDict({"linear": linear, "conv": conv})
    x = torch.randn(3, 5, 40)
    images = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected_linear, expected_conv = linear(x).numpy(), conv(images).numpy()
        uncorrected = nn.functional.linear(x, linear.weight_quantizer(linear.weight), linear.bias).numpy()
    out_linear = run(parts, lambda e, n: e.linear(n, linear), x)
    out_conv = run(parts, lambda e, n: e.conv(n, conv), images)
    np.testing.assert_allclose(out_linear, expected_linear, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out_conv, expected_conv, rtol=0, atol=1e-5)
    assert np.abs(uncorrected - expected_linear).max() > 1e-3  # the correction's offset term is not negligible


def test_weight_is_an_integer_initializer_that_dequantizes_to_the_fake_quantized_weight():
    torch.manual_seed(7)
    for bits in range(2, 9):
        for signed in (False, True):
            layer = QLinear.from_float(nn.Linear(16, 5), BitType(bits, signed))
            layer.calibrate_weight()
            layer.weight_quantizer.enabled = True
            x = torch.eye(16)
            with torch.no_grad():
                expected = nn.functional.linear(x, layer.quantized_weight()).numpy()
            layer.bias = None
            out = run(nn.ModuleDict({"l": layer}), lambda e, n, layer=layer: e.linear(n, layer), x)
            np.testing.assert_array_equal(out, expected)  # x = I: the rows of Wᵀ themselves, bit for bit

            g = Graph()
            Emitter(g, nn.ModuleDict({"l": layer})).weight(layer)
            (stored,) = [t for t in g.initializers if t.name == "l.weight.qvalues"]
            assert stored.data_type == {(True, False): TensorProto.UINT4, (True, True): TensorProto.INT4,
                                        (False, False): TensorProto.UINT8, (False, True): TensorProto.INT8}[
                                            (bits <= 4, signed)]
            values = numpy_helper.to_array(stored).astype(np.int64)
            assert values.min() >= layer.weight_quantizer.bit_type.qmin
            assert values.max() <= layer.weight_quantizer.bit_type.qmax
