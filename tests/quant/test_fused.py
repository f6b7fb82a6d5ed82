"""The compiled one-pass kernels give the bits of the eager inference path: fake quantization (fresh buffer and in
place), integer LayerNorm, a whole quantized ViT in fp32 and under bf16 autocast, and a whole search."""

import pytest
import torch

from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.fused import fused_enabled, fused_kernels
from evolq_pl.quant.layers import int_layer_norm
from tests.quant.test_fast_paths import _same_bits, _tiny_deit


def _eager_and_fused(fn):
    with torch.no_grad():
        eager = fn()
        with fused_kernels():
            assert fused_enabled()
            fused = fn()
    assert not fused_enabled()
    return fused, eager


@pytest.mark.parametrize("bits,signed", [(8, False), (3, True)])
@pytest.mark.parametrize("dim,shape", [(None, (4, 50, 24)), (-1, (4, 50, 24)), (0, (24, 40))])
def test_fused_fake_quantize_has_the_eager_bits(bits, signed, dim, shape):
    bt = BitType(bits, signed)
    g = torch.Generator().manual_seed(bits + len(shape))
    x = torch.randn(shape, generator=g) * 3
    flat = x.view(-1)
    flat[:7] = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, -0.2, 0.25, 1e30])
    channels = 1 if dim is None else shape[dim]
    scale = torch.rand(channels, generator=g) * 0.1 + 0.01
    zp = torch.randint(bt.qmin, bt.qmax + 1, (channels,), generator=g).float()
    if dim is None:  # exact ties of round(x/s + z)
        scale[0] = 0.5
        flat[8:12] = (torch.tensor([0.5, 1.5, 2.5, -0.5]) - zp[0]) * 0.5
    fused, eager = _eager_and_fused(lambda: F.fake_quantize(x, scale, zp, bt, dim))
    assert _same_bits(fused, eager)
    fused, eager = _eager_and_fused(lambda: F.fake_quantize_(x.clone(), scale, zp, bt, dim))  # into its input
    assert _same_bits(fused, eager)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_int_layer_norm_has_the_eager_bits(seed):
    g = torch.Generator().manual_seed(seed)
    channels = 48
    base = torch.rand(1, generator=g) * 0.05 + 0.005
    in_scale = base * 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()
    x = torch.round(torch.randn(3, 17, channels, generator=g) * 40) * in_scale
    gamma = 1 + 0.3 * torch.randn(channels, generator=g)
    gamma[:3] = torch.tensor([-0.7, 1e-30, 0.0])  # a negative, an underflowing and a zero gain
    beta = 0.2 * torch.randn(channels, generator=g)
    x[0, 0] = x[0, 0, :1]  # a constant row: zero variance
    out_scale = torch.tensor([0.04])
    fused, eager = _eager_and_fused(lambda: int_layer_norm(x, in_scale, out_scale, gamma, beta))
    assert _same_bits(fused, eager)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_quantized_vit_has_the_eager_bits(autocast):
    qmodel = _tiny_deit()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return qmodel.forward_from(1, qmodel.forward_to(1, x))

    fused, eager = _eager_and_fused(run)
    assert _same_bits(fused, eager)


def test_fused_without_a_compiler_fails_with_a_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/clang++ anywhere
    with pytest.raises(RuntimeError, match="fused: false"), fused_kernels():
        pass
    assert not fused_enabled()
