"""An ONNX graph written node by node with onnx.helper: readable names, integer initializers, one opset.

The legacy ``torch.onnx`` tracer knows fake quantization only with 8-bit ranges, and a trace would hide which
integer tensor each weight becomes; writing the graph directly keeps every initializer's type and every Q/DQ
pair explicit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # int4/uint4 tensors and per-axis Q/DQ on them (ONNX 1.16)
IR_VERSION = 10  # the IR of opset 21, which ONNX Runtime 1.18+ reads

# ONNX integer types a b-bit grid is stored in: 4-bit where it fits (opset 21), else 8-bit containers
_CONTAINERS = {(4, False): TensorProto.UINT4, (4, True): TensorProto.INT4,
               (8, False): TensorProto.UINT8, (8, True): TensorProto.INT8}
_NUMPY_TYPES = {TensorProto.UINT4: ml_dtypes.uint4, TensorProto.INT4: ml_dtypes.int4,
                TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def container_bits(bits: int) -> int:
    """Bits of the ONNX integer type that holds a b-bit grid: 4 for b <= 4, else 8."""
    return 4 if bits <= 4 else 8


def container_type(bits: int, signed: bool) -> int:
    """The ONNX element type (TensorProto enum) that holds a b-bit grid."""
    return _CONTAINERS[(container_bits(bits), signed)]


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


class Graph:
    """Nodes and initializers of one ONNX graph; every tensor gets a unique name derived from a hint."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        """A fresh tensor name: the hint (a module path plus what it is), suffixed when already taken."""
        base = re.sub(r"[^A-Za-z0-9_./:-]", "_", hint) or "t"
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def initializer(self, hint: str, value: np.ndarray) -> str:
        """A float or integer numpy array as an initializer."""
        name = self.name(hint)
        value = np.asarray(value)
        self.initializers.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def int_initializer(self, hint: str, values: np.ndarray, elem_type: int) -> str:
        """Integer values stored as ``elem_type`` (int4/uint4 are packed two per byte by onnx.helper)."""
        name = self.name(hint)
        array = np.asarray(values).astype(_NUMPY_TYPES[elem_type])
        self.initializers.append(numpy_helper.from_array(array, name))  # raw bytes, 4-bit types two per byte
        return name

    def const(self, value: Any, dtype: type = np.float32) -> str:
        """A small shared constant (scalars, shapes, axes), created once per value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            hint = f"const_{array.item():g}" if array.size == 1 and array.dtype.kind == "f" else "const"
            self._consts[key] = self.initializer(hint, array)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], hint: str, outputs: int = 1, **attrs: Any) -> str | list[str]:
        """Append a node; returns its output name (or names, with ``outputs`` > 1)."""
        names = [self.name(f"{hint}/{op_type}" + (f":{i}" if outputs > 1 else "")) for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names if outputs > 1 else names[0]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "evolq_pl", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="evolq-pl",
                                  doc_string=doc)
        model.ir_version = IR_VERSION
        helper.set_model_props(model, metadata or {})
        return model


def float_input(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def integer_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every integer initializer of a model as a numpy array (int4/uint4 unpacked to one value per element)."""
    return {t.name: numpy_helper.to_array(t).astype(np.int16) for t in model.graph.initializer
            if t.data_type in _NUMPY_TYPES}
