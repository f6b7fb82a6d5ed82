"""Bit types and the quantization recipe: the grids users can ask for, and clear refusals of the rest."""

import pytest

from evolq_pl.quant.bit_types import BitType, bit_type
from evolq_pl.quant.config import QuantConfig


@pytest.mark.parametrize("bits", range(2, 9))
def test_unsigned_and_signed_ranges(bits):
    u, s = BitType(bits, False), BitType(bits, True)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert u.levels == s.levels == 2**bits - 1
    assert (u.name, s.name) == (f"uint{bits}", f"int{bits}")
    assert bit_type(u.name) == u and bit_type(s.name) == s


@pytest.mark.parametrize("bits", [1, 9])
def test_bit_widths_outside_two_to_eight_are_rejected(bits):
    with pytest.raises(ValueError, match=f"unsupported bit width {bits}: use an integer from 2 to 8"):
        BitType(bits, False)
    with pytest.raises(ValueError, match="from 2 to 8"):
        bit_type(f"uint{bits}")


def test_unknown_bit_type_names_are_rejected():
    with pytest.raises(ValueError, match="unknown bit type 'fp32'"):
        bit_type("fp32")


@pytest.mark.parametrize("field", ["w_bits", "a_bits"])
@pytest.mark.parametrize("bits", [1, 9])
def test_quant_config_rejects_bits_outside_two_to_eight(field, bits):
    with pytest.raises(ValueError, match=f"{field}={bits} is not supported: use an integer from 2 to 8"):
        QuantConfig(**{field: bits})
    with pytest.raises(ValueError, match=field):
        QuantConfig.from_preset("e2e", **{field: bits})


def test_e2e_preset_is_the_reference_run_script():
    cfg = QuantConfig.from_preset("e2e")
    assert cfg.weight_type == BitType(4, False) and cfg.act_type == BitType(8, False)
    assert (cfg.weight_observer, cfg.act_observer, cfg.ptf_observer) == ("minmax", "omse", "ptf")
    assert cfg.bias_correction and cfg.int_norm and cfg.softmax == "uniform" and cfg.fit_on == "last"


def test_fq_vit_preset_uses_signed_symmetric_weights_without_bias_correction():
    cfg = QuantConfig.from_preset("fq_vit", w_bits=8)
    assert cfg.weight_type == BitType(8, True)
    assert not cfg.bias_correction and cfg.act_observer == "minmax"


def test_preset_overrides_apply_and_none_passes_through():
    cfg = QuantConfig.from_preset("e2e", w_bits=3, a_bits=None, ptf=False)
    assert cfg.w_bits == 3 and cfg.a_bits == 8
    assert cfg.ptf_observer == "omse"  # without PTF, LayerNorm inputs use the activation observer


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_observer": "ptf"}, "weight_observer='ptf'"),
    ({"act_observer": "kl"}, "act_observer='kl'"),
    ({"softmax": "int"}, "softmax='int'"),
    ({"fit_on": "first"}, "fit_on='first'"),
])
def test_invalid_choices_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown preset 'fp'"):
        QuantConfig.from_preset("fp")
