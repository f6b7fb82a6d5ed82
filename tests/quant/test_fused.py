"""The compiled one-pass kernels give the bits of the eager inference path: fake quantization (fresh buffer and in
place), integer LayerNorm, a whole quantized ViT in fp32 and under bf16 autocast, and a whole search; inductor's
C++ kernels on the CPU, its Triton kernels on a CUDA GPU where there is one (the ``device`` fixture)."""

import threading

import pytest
import torch
import torch._dynamo

from evolq_pl.quant import formulas, fused
from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.fused import fused_enabled, fused_kernels, same_bits
from evolq_pl.quant.layers import int_layer_norm
from tests.quant.test_fast_paths import fq_inputs, int_ln_inputs, tiny_deit_run


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
    assert same_bits(fused, eager)
    fused, eager = _eager_and_fused(lambda: F.fake_quantize_(x.clone(), scale, zp, bt, dim))  # into its input
    assert same_bits(fused, eager)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_int_layer_norm_has_the_eager_bits(seed, device):
    args = int_ln_inputs(seed, device)
    fused, eager = _eager_and_fused(lambda: int_layer_norm(*args))
    assert same_bits(fused, eager)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_quantized_vit_has_the_eager_bits(autocast, device):
    (suffix, full), (suffix_eager, full_eager) = _eager_and_fused(tiny_deit_run(autocast, device))
    assert same_bits(suffix, suffix_eager) and same_bits(full, full_eager)


def test_fused_without_a_compiler_fails_with_a_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/clang++ anywhere
    with pytest.raises(RuntimeError, match="fused: false"), fused_kernels():
        pass
    assert not fused_enabled()


def test_fused_raises_dynamos_recompile_limit_only_while_on():
    config = torch._dynamo.config
    before = config.recompile_limit
    with fused_kernels():
        assert fused_enabled() and config.recompile_limit >= 64
    assert not fused_enabled() and config.recompile_limit == before


def test_same_bits_tells_signed_zeros_apart_and_matches_nans_by_place():
    a = torch.tensor([0.0, float("nan"), 1.5])
    assert same_bits(a, a.clone()) and same_bits(a.bfloat16(), a.clone().bfloat16())
    assert not same_bits(a, torch.tensor([-0.0, float("nan"), 1.5]))
    assert not same_bits(a, torch.tensor([0.0, 1.0, 1.5])) and not same_bits(a, a.double())


def test_a_kernel_that_disagrees_with_eager_stops_the_run(monkeypatch):
    # stands in for a miscompiled or stale cached kernel: one ulp off on its first call of a new variant
    monkeypatch.setitem(fused._state, "checked", set())
    unsigned = fused.traced(formulas.fake_quantize, signed=False)
    monkeypatch.setitem(fused._state, "kernels", {"fq_unsigned": lambda *args: torch.nextafter(
        unsigned(*args), torch.tensor(float("inf")))})
    bt = BitType(8, False)
    x, scale, zp = fq_inputs(bt, None, (4, 50, 24), zero=True, seed=0)
    with torch.no_grad(), fused_kernels(), pytest.raises(RuntimeError, match="compiled fq_unsigned kernel.*fused: false"):
        F.fake_quantize(x, scale, zp, bt)
    assert not fused._state["checked"]  # a variant that failed its check is never trusted


def test_each_kernel_variant_is_checked_once(monkeypatch):
    monkeypatch.setitem(fused._state, "checked", set())
    bt = BitType(8, False)
    with torch.no_grad(), fused_kernels():
        for shape in [(4, 50, 24), (2, 7, 3), (4800,)]:  # the second is the first's variant, the third a new rank
            x, scale, zp = fq_inputs(bt, None, shape, zero=True, seed=0)
            F.fake_quantize(x, scale, zp, bt)
    assert len(fused._state["checked"]) == 2


@torch._dynamo.config.patch(recompile_limit=5)
def test_fused_kernels_restore_the_previous_choice_and_recompile_limit_also_when_the_body_raises():
    config = torch._dynamo.config
    with pytest.raises(KeyError), fused_kernels():
        assert fused_enabled() and config.recompile_limit == 64
        with fused_kernels(False):
            assert not fused_enabled() and config.recompile_limit == 64
        assert fused_enabled()
        with pytest.raises(ValueError), fused_kernels():
            raise ValueError("an inner body fails")
        assert fused_enabled() and config.recompile_limit == 64
        raise KeyError("the body fails")
    assert not fused_enabled() and config.recompile_limit == 5


def test_fused_kernels_in_one_thread_leave_other_threads_eager():
    seen = []
    with fused_kernels():
        worker = threading.Thread(target=lambda: seen.append(fused_enabled()))
        worker.start()
        worker.join()
    assert seen == [False]


@pytest.mark.parametrize("fn,static", [
    (formulas.fake_quantize, {"signed": False}), (formulas.fake_quantize, {"signed": True}),
    (formulas.fake_quantize, {"signed": False, "inplace": True}),
    (formulas.fake_quantize, {"signed": True, "inplace": True}),
    (formulas.ln_align, {}), (formulas.ln_affine, {})])
def test_each_kernel_traces_to_one_graph(fn, static):
    """A graph break would split a kernel into several passes: slower, though still bit-checked."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 5, 8, generator=g), torch.rand(8, generator=g) + 0.1
    rows = torch.rand(2, 5, 1, generator=g) + 0.1
    args = {"fake_quantize": (x, c, torch.zeros(8), -4.0 if static.get("signed") else 0.0, 3.0),
            "ln_align": (x, c, torch.ones(8)),
            "ln_affine": (x.round(), torch.empty(2, 5, 8), rows, rows, c, c, torch.tensor([0.04]))}[fn.__name__]
    explained = torch._dynamo.explain(fused.traced(fn, **static))(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
