"""The compiled one-pass kernels give the bits of the eager inference path: fake quantization (fresh buffer and in
place), integer LayerNorm, a whole quantized ViT in fp32 and under bf16 autocast, and a whole search; inductor's
C++ kernels on the CPU, its Triton kernels on a CUDA GPU where there is one (the ``device`` fixture)."""

import pytest
import torch

from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.fused import fused_enabled, fused_kernels
from evolq_pl.quant.layers import int_layer_norm
from tests.quant.test_fast_paths import _same_bits, fq_inputs, int_ln_inputs, tiny_deit_run


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
@pytest.mark.parametrize("zero", [False, True])
def test_fused_fake_quantize_has_the_eager_bits(bits, signed, dim, shape, zero, device):
    bt = BitType(bits, signed)
    x, scale, zp = fq_inputs(bt, dim, shape, zero, seed=bits + len(shape), device=device)
    fused, eager = _eager_and_fused(lambda: F.fake_quantize(x, scale, zp, bt, dim))
    assert _same_bits(fused, eager)
    fused, eager = _eager_and_fused(lambda: F.fake_quantize_(x.clone(), scale, zp, bt, dim))  # into its input
    assert _same_bits(fused, eager)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_int_layer_norm_has_the_eager_bits(seed, device):
    args = int_ln_inputs(seed, device)
    fused, eager = _eager_and_fused(lambda: int_layer_norm(*args))
    assert _same_bits(fused, eager)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_quantized_vit_has_the_eager_bits(autocast, device):
    (suffix, full), (suffix_eager, full_eager) = _eager_and_fused(tiny_deit_run(autocast, device))
    assert _same_bits(suffix, suffix_eager) and _same_bits(full, full_eager)


def test_fused_without_a_compiler_fails_with_a_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/clang++ anywhere
    with pytest.raises(RuntimeError, match="fused: false"), fused_kernels():
        pass
    assert not fused_enabled()


def test_fused_raises_dynamos_recompile_limit_only_while_on():
    import torch._dynamo

    config = torch._dynamo.config
    before = config.recompile_limit
    with fused_kernels():
        assert fused_enabled() and config.recompile_limit >= 64
    assert not fused_enabled() and config.recompile_limit == before
