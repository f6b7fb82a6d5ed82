"""The runtime-neutral record: bit packing, names from the quantization map, what it stores and what it leaves out."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import numpy_helper

from evolq_pl.export.record import build_record, load_record, pack_bits, unpack_bits, write_record
from evolq_pl.export.registry import quantized_mode
from evolq_pl.models.vit import QuantViT
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate
from evolq_pl.testing import unit_gain_vit


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_packing_round_trips_in_ceil_n_b_over_8_bytes(bits, signed):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.random.default_rng(bits).integers(low, high + 1, size=(7, 13))
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(values.size * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, signed, values.size).reshape(values.shape), values)


@pytest.mark.parametrize("signed", [False, True])
def test_four_bit_packing_is_onnx_int4_packing(signed):
    values = np.arange(-8, 8) if signed else np.arange(16)
    values = np.concatenate([values, values[::-1], values[:3]])
    onnx_bytes = numpy_helper.from_array(values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)).raw_data
    assert pack_bits(values, 4).tobytes() == onnx_bytes


@pytest.fixture(scope="module")
def calibrated_deit() -> QuantViT:
    qmodel = QuantViT(unit_gain_vit(), QuantConfig(w_bits=3, softmax="log2"), "deit_tiny_patch16_224").eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate(qmodel, [images[:8], images[8:]])
    return qmodel


def test_record_names_every_quantized_tensor_as_the_quantization_map_does(calibrated_deit, tmp_path):
    with quantized_mode(calibrated_deit):
        write_record(calibrated_deit, tmp_path, {"source": "test"})
    header, tensors = load_record(tmp_path)
    rows = calibrated_deit.quant_map()
    assert list(header["tensors"]) == [r["tensor"] for r in rows]
    assert header["source"] == "test" and header["model"] == "deit_tiny_patch16_224"
    for row in rows:
        entry = header["tensors"][row["tensor"]]
        assert entry["kind"] == row["kind"] and entry["bit_type"] == row["bits"]
        assert entry["granularity"] == row["granularity"]
        assert all(key in tensors for key in entry["keys"].values())
    qkv = header["tensors"]["blocks.0.attn.qkv"]
    assert qkv["bits"] == 3 and not qkv["signed"] and qkv["axis"] == 0 and qkv["bias_correction"]
    assert set(qkv["keys"]) == {"qvalues", "scale", "zero_point", "gain", "offset"}
    assert tensors["blocks.0.attn.qkv.qvalues"].size == math.ceil(np.prod(qkv["shape"]) * 3 / 8)
    q_res1 = calibrated_deit.blocks[0].q_res1  # PTF: per-channel scales along the last axis
    assert header["tensors"]["blocks.0.q_res1"]["axis"] == -1
    assert np.array_equal(tensors["blocks.0.q_res1.scale"], q_res1.scale.numpy())
    assert np.array_equal(tensors["blocks.0.q_res1.zero_point"], q_res1.zero_point.numpy().astype(np.int32))
    log2 = header["tensors"]["blocks.0.attn.softmax"]
    assert log2["quantizer"] == "log2" and log2["keys"] == {}


def test_record_keeps_the_float_parameters_and_not_the_float_weights(calibrated_deit):
    with quantized_mode(calibrated_deit):
        header, tensors = build_record(calibrated_deit)
    floats = header["float_tensors"]
    for name in ("cls_token", "pos_embed", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.bias"):
        assert name in floats and np.array_equal(tensors[name], calibrated_deit.get_parameter(name).detach().numpy())
    assert not [n for n in floats if n.endswith(".weight") and ("attn" in n or "fc" in n or "head" in n)]
    weights = [e for e in header["tensors"].values() if e["kind"] == "weight"]
    sizes = header["sizes"]  # 3 of 32 bits per weight, each tensor padded to whole bytes
    assert sizes["fp32_weight_bytes"] * 3 / 32 <= sizes["packed_weight_bytes"] < sizes["fp32_weight_bytes"] * 3 / 32 + len(weights)


def test_a_folder_without_a_record_is_refused(tmp_path):
    (tmp_path / "quantized.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not an evolq-pl quantized record"):
        load_record(tmp_path)
