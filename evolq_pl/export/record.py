"""The runtime-neutral record of a quantized model: ``quantized.safetensors`` + ``quantized.json``.

Every quantized tensor is listed under its name in the quantization map (``QuantizedModel.quant_map``): weights as
integers packed to their bit width with per-output-channel scales and zero points (and the bias correction's
per-row gain and offset), activations as their scales and zero points. The model's float parameters that are not
quantized (biases, LayerNorm affines, class token, position embedding, attention biases) are stored as float32
under their parameter names, so the record alone rebuilds the quantized model; reading it needs numpy and
safetensors only (:func:`load_record`, :func:`dequantize`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from evolq_pl.export.graph import container_bits
from evolq_pl.export.grids import WeightGrid, scales, weight_grid, zero_points
from evolq_pl.models.base import QuantizedModel
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import quantizers
from evolq_pl.quant.quantizer import FakeQuantizer

FORMAT = "evolq-pl quantized record"
VERSION = 1
TENSORS_FILE, JSON_FILE = "quantized.safetensors", "quantized.json"
PACKING = ("b-bit integers in row-major order as one little-endian bit stream: element i holds bits "
           "[i*b, (i+1)*b) of the stream, least significant bit first (byte j holds bits 8j..8j+7, LSB first); "
           "signed values in b-bit two's complement. For b = 4 this is ONNX's int4/uint4 packing.")
DEQUANTIZE = ("weight = gain * (q - zero_point) * scale + offset per output channel (axis 0; gain 1 and offset 0 "
              "without bias correction); activation = (clamp(round(x / scale + zero_point), qmin, qmax) - "
              "zero_point) * scale, per tensor or per channel along 'axis'; log2 activations: 2^-round(-log2 x) "
              "for round(-log2 x) in [0, 2^bits - 1], else 0")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers (signed ones as two's complement) into ceil(n·bits/8) bytes, see ``PACKING``."""
    flat = values.astype(np.int64).ravel() & ((1 << bits) - 1)
    stream = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, signed: bool, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits` for ``count`` values."""
    stream = np.unpackbits(packed, bitorder="little", count=count * bits).reshape(count, bits)
    values = (stream.astype(np.int64) << np.arange(bits)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values


def _weight_entry(name: str, grid: WeightGrid, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    keys = {"qvalues": f"{name}.qvalues", "scale": f"{name}.scale", "zero_point": f"{name}.zero_point"}
    tensors[keys["qvalues"]] = pack_bits(grid.values, grid.bits)
    tensors[keys["scale"]] = grid.scale.astype(np.float32)
    tensors[keys["zero_point"]] = grid.zero_point.astype(np.int32)
    if grid.gain is not None:
        keys |= {"gain": f"{name}.gain", "offset": f"{name}.offset"}
        tensors[keys["gain"]] = grid.gain.astype(np.float32)
        tensors[keys["offset"]] = grid.offset.astype(np.float32)
    return {"shape": list(grid.values.shape), "axis": 0, "qmin": grid.qmin, "qmax": grid.qmax, "keys": keys}


def _activation_entry(name: str, q: FakeQuantizer, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    keys = {"scale": f"{name}.scale", "zero_point": f"{name}.zero_point"}
    tensors[keys["scale"]] = scales(q, name)
    tensors[keys["zero_point"]] = zero_points(q, name).astype(np.int32)
    return {"axis": q.dim, "qmin": q.bit_type.qmin, "qmax": q.bit_type.qmax, "keys": keys}


def build_record(model: QuantizedModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The record's json part and its tensors for a calibrated model in quantized mode."""
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    layers = {id(m.weight_quantizer): m for m in model.modules() if isinstance(m, QLinear | QConv2d)}
    sizes = {"fp32_weight_bytes": 0, "packed_weight_bytes": 0, "onnx_weight_bytes": 0, "qparam_bytes": 0}
    for row, (_, q) in zip(model.quant_map(), quantizers(model), strict=True):
        name = row["tensor"]
        entry: dict[str, Any] = {k: row[k] for k in ("kind", "quantizer", "bits", "granularity", "observer")}
        entry |= {"bits": q.bit_type.bits, "signed": q.bit_type.signed, "bit_type": q.bit_type.name,
                  "bias_correction": row["bias_correction"] == "yes"}
        if id(q) in layers:
            grid = weight_grid(layers[id(q)], name)
            entry |= _weight_entry(name, grid, tensors)
            count = grid.values.size
            sizes["fp32_weight_bytes"] += 4 * count
            sizes["packed_weight_bytes"] += math.ceil(count * grid.bits / 8)
            sizes["onnx_weight_bytes"] += math.ceil(count * container_bits(grid.bits) / 8)
            sizes["qparam_bytes"] += sum(tensors[k].nbytes for k in entry["keys"].values() if k != name + ".qvalues")
        elif isinstance(q, FakeQuantizer):
            entry |= _activation_entry(name, q, tensors)
        else:  # log2 grid: nothing to store
            entry |= {"axis": None, "keys": {}}
        entries[name] = entry
    floats = _float_tensors(model, layers)
    clash = sorted(set(floats) & set(tensors))
    if clash:
        raise ValueError(f"parameter name {clash[0]} clashes with a quantized tensor's key in the record")
    tensors |= floats
    header = {"format": FORMAT, "version": VERSION, "model": model.model_name, "qconfig": repr(model.qconfig),
              "packing": PACKING, "dequantize": DEQUANTIZE, "tensors": entries,
              "float_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in floats.items()},
              "sizes": sizes}
    return header, tensors


def _float_tensors(model: QuantizedModel, layers: dict[int, QLinear | QConv2d]) -> dict[str, np.ndarray]:
    """Parameters and buffers the quantized model computes with, other than quantized weights and quantizer state."""
    quantized_weights = {id(layer.weight) for layer in layers.values()}
    quantizer_state = {id(b) for _, q in quantizers(model) for b in q.buffers()}
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in quantized_weights or id(t) in quantizer_state:
            continue
        array = t.detach().cpu().numpy()
        out[name] = array.astype(np.float32) if array.dtype.kind == "f" else array
    return out


def write_record(model: QuantizedModel, folder: Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``quantized.safetensors`` and ``quantized.json`` into ``folder``; returns the json part."""
    header, tensors = build_record(model)
    header |= info or {}
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT, "json": JSON_FILE})
    (folder / JSON_FILE).write_text(json.dumps(header, indent=1, default=str) + "\n")
    return header


def load_record(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The json part and the tensors of a record written by :func:`write_record`."""
    folder = Path(folder)
    header = json.loads((folder / JSON_FILE).read_text())
    if header.get("format") != FORMAT:
        raise ValueError(f"{folder / JSON_FILE} is not an {FORMAT}")
    return header, load_file(str(folder / TENSORS_FILE))


def weight_values(header: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The integer grid values of weight ``name``, unpacked to its shape."""
    entry = header["tensors"][name]
    count = int(np.prod(entry["shape"]))
    values = unpack_bits(tensors[entry["keys"]["qvalues"]], entry["bits"], entry["signed"], count)
    return values.reshape(entry["shape"])


def dequantize(header: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Weight ``name`` as float32, rebuilt from its integers as ``DEQUANTIZE`` says."""
    entry = header["tensors"][name]
    keys = entry["keys"]
    shape = (-1,) + (1,) * (len(entry["shape"]) - 1)
    q = weight_values(header, tensors, name).astype(np.float32)
    w = (q - tensors[keys["zero_point"]].astype(np.float32).reshape(shape)) * tensors[keys["scale"]].reshape(shape)
    if "gain" in keys:
        w = tensors[keys["gain"]].reshape(shape) * w + tensors[keys["offset"]].reshape(shape)
    return w
