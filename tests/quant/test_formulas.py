"""The one definition of each formula gives the same bits on its three backends (the traced one run eagerly here;
compiled in test_fused.py), and the in-place backend writes only where it is told to."""

import pytest
import torch

from evolq_pl.quant import formulas
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.fused import same_bits
from tests.quant.test_fast_paths import fq_inputs, int_ln_inputs

BACKENDS = [formulas.Eager, formulas.InPlace, formulas.Traced]


@pytest.mark.parametrize("bits,signed", [(8, False), (2, False), (4, True), (3, True)])
@pytest.mark.parametrize("dim", [None, -1])
def test_fake_quantize_gives_the_same_bits_on_every_backend(bits, signed, dim):
    bt = BitType(bits, signed)
    x, scale, zp = fq_inputs(bt, dim, (4, 50, 24), zero=False, seed=bits)
    if dim is not None:
        scale, zp = scale.reshape(1, 1, -1), zp.reshape(1, 1, -1)
    with torch.no_grad():
        fresh = [formulas.fake_quantize(ops, x, scale, zp, bt.qmin, bt.qmax, signed=signed) for ops in BACKENDS]
        written = [formulas.fake_quantize(ops, x.clone(), scale, zp, bt.qmin, bt.qmax, signed=signed, inplace=True)
                   for ops in BACKENDS]
    assert all(same_bits(out, fresh[0]) for out in fresh + written)


def test_in_place_fake_quantize_writes_over_its_input_only_when_asked():
    bt = BitType(8, False)
    x, scale, zp = fq_inputs(bt, None, (3, 10, 8), zero=False, seed=0)
    before = x.clone()
    with torch.no_grad():
        out = formulas.fake_quantize(formulas.InPlace, x, scale, zp, bt.qmin, bt.qmax, signed=False)
        assert same_bits(x, before) and out is not x
        out = formulas.fake_quantize(formulas.InPlace, x, scale, zp, bt.qmin, bt.qmax, signed=False, inplace=True)
    assert out is x and not same_bits(x, before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int_layer_norm_gives_the_same_bits_on_every_backend_and_leaves_its_inputs_alone(seed):
    args = int_ln_inputs(seed)
    before = [a.clone() for a in args]
    with torch.no_grad():
        outs = [formulas.int_layer_norm(ops, *args) for ops in BACKENDS]
    assert all(same_bits(out, outs[0]) for out in outs)
    assert all(same_bits(a, b) for a, b in zip(args, before, strict=True))


def test_ptf_scale_multiplies_the_base_by_exact_powers_of_two():
    base = torch.tensor(0.0123)
    scales = formulas.ptf_scale(base, torch.arange(4.0))
    assert torch.equal(scales, torch.stack([base, base * 2, base * 4, base * 8]))
    assert torch.equal(formulas.ptf_scale(base, 3), scales[3])
