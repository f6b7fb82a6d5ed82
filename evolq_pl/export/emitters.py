"""Per-layer ONNX emitters: each writes one quantized layer (or quantizer) of the project into a :class:`Graph`.

A family exporter (``evolq_pl.export.vit``, ``.levit``) only wires these together in its model's forward order, so
a new family reuses them. Every emitter mirrors the PyTorch layer's formula op by op, in float32, so the ONNX model
computes what the project evaluates; where ONNX Runtime's kernels round differently the README states it (export
section) and ``benchmarks/export_accuracy.py`` measures it. With ``quantized=False`` the same emitters write the FP
model (no quantizers, float weights, float LayerNorm): the FP32 baseline of the speed benchmark.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from evolq_pl.export.errors import ExportError
from evolq_pl.export.graph import Graph, container_bits, container_type
from evolq_pl.export.grids import grid_values, scales, weight_grid, zero_points
from evolq_pl.quant.layers import QConv2d, QIntLayerNorm, QLinear, QSoftmax
from evolq_pl.quant.quantizer import FakeQuantizer, Log2Quantizer

TINY = float(torch.finfo(torch.float32).tiny)
INT_LN_MAX_MULTIPLIER = 255  # integer LayerNorm: m in [0, 255], shift n in [0, 31] (evolq_pl.quant.layers)
INT_LN_MAX_SHIFT = 31

# How each op is exported; the export log lists the ones a model uses.
FORMS = {
    "weight": "integer initializer (per-output-channel DequantizeLinear, axis 0)",
    "bias_correction": "exact: DequantizeLinear scale gain·s per row, plus the offset c·Σx (ReduceSum, Mul, Add)",
    "activation": "QuantizeLinear/DequantizeLinear pair with the calibrated scale and zero point",
    "ptf": "per-channel QuantizeLinear/DequantizeLinear (PTF's 2^α factors folded into per-channel scales)",
    "int_layer_norm": "integer LayerNorm, its algorithm written in float32 ops (integer and dyadic values, as in "
                      "PyTorch; floor(log2) exact)",
    "layer_norm": "float LayerNormalization",
    "softmax_uniform": "float Softmax, then QuantizeLinear/DequantizeLinear",
    "softmax_log2": "float Softmax, then the log2 grid 2^-round(-log2 p) in float ops",
    "softmax_lis": "log-int-softmax: integer exp and log2 grid written in float32 ops, as in PyTorch",
}


class Emitter:
    """Writes a model's layers into a graph, tracking which quantizers are exported and which op forms are used."""

    def __init__(self, graph: Graph, model: nn.Module, quantized: bool = True) -> None:
        self.g = graph
        self.quantized = quantized
        self._names = {id(m): name for name, m in model.named_modules()}
        self.emitted: set[int] = set()
        self.forms: dict[str, str] = {}
        self.containers: dict[str, str] = {}  # "b-bit signed/unsigned weights" -> ONNX type used
        self._dequantized: dict[str, tuple[str, str, np.ndarray, int | None]] = {}  # DQ -> (Q, zp, scale, axis)
        self.outputs: dict[str, str] = {}  # quantizer name -> graph tensor holding its output

    def name_of(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def _form(self, key: str) -> None:
        self.forms[key] = FORMS[key]

    # -- quantizers ----------------------------------------------------------------------------------------------

    def quantize(self, x: str, q: nn.Module | None) -> str:
        """A quantizer on tensor ``x``: Q/DQ for a uniform grid, float ops for a log2 grid; None passes ``x``."""
        if q is None:
            return x
        self.emitted.add(id(q))
        if not self.quantized:
            return x
        name = self.name_of(q)
        if isinstance(q, Log2Quantizer):
            self.outputs[name] = self.log2_grid(x, q.bit_type.bits, name)
            return self.outputs[name]
        if not isinstance(q, FakeQuantizer):
            raise ExportError(f"{name}: quantizer type {type(q).__name__} cannot be exported")
        self._form("activation" if q.dim is None else "ptf")
        scale, zp, axis = self._qparams(q, name)
        attrs = {} if axis is None else {"axis": axis}
        y = self.g.op("QuantizeLinear", [x, scale, zp], name, **attrs)
        bt = q.bit_type
        if bt.bits < 8:  # a b-bit grid in an 8-bit container: saturate to the grid's own ends
            dtype = np.int8 if bt.signed else np.uint8
            y = self.g.op("Clip", [y, self.g.const(bt.qmin, dtype), self.g.const(bt.qmax, dtype)], name)
        out = self.g.op("DequantizeLinear", [y, scale, zp], name, **attrs)
        self._dequantized[out] = (y, zp, scales(q, name), axis)
        self.outputs[name] = out
        return out

    def _per_tensor_dq(self, x: str) -> bool:
        """Whether ``x`` is the output of a per-tensor DequantizeLinear (an integer kernel's input)."""
        return x in self._dequantized and self._dequantized[x][3] is None

    def _unfused(self, x: str, per_tensor: bool = False) -> str:
        """``x`` with its DequantizeLinear rewritten as a unit-scale DequantizeLinear and a Mul by the scale (the same
        values bit for bit), which keeps ONNX Runtime from fusing it with the op that reads it.

        Applied to per-channel (PTF) inputs of MatMul and Conv, which ONNX Runtime 1.32 fuses into
        MatMulIntegerToFloat and then refuses at run time (per-channel zero points), and with ``per_tensor`` to
        the softmax input, whose fusion into QLinearSoftmax (a table of exponentials) is not the project's float
        softmax.
        """
        if x not in self._dequantized or (self._dequantized[x][3] is None and not per_tensor):
            return x
        y, zp, scale, axis = self._dequantized[x]
        if axis is None:
            unit = self.g.op("DequantizeLinear", [y, self.g.const(1.0), zp], x)
            return self.g.op("Mul", [unit, self.g.const(float(scale[0]))], x)
        if axis not in (-1, 1):
            raise ExportError(f"{x}: a per-channel activation on axis {axis} cannot feed a MatMul or Conv")
        shape = (-1,) if axis == -1 else (-1, 1, 1)  # tokens [B, N, C] or images [B, C, H, W]
        unit = self.g.op("DequantizeLinear", [y, self.g.const(np.ones(len(scale)), np.float32), zp], x, axis=axis)
        return self.g.op("Mul", [unit, self.g.const(scale.reshape(shape))], x)

    def _qparams(self, q: FakeQuantizer, name: str) -> tuple[str, str, int | None]:
        """Scale and zero-point initializers of an activation quantizer (8-bit container), and its axis."""
        s, zp = scales(q, name), zero_points(q, name)
        elem = container_type(8, q.bit_type.signed)
        if q.dim is None:
            return (self.g.initializer(f"{name}.scale", s.reshape(())),
                    self.g.int_initializer(f"{name}.zero_point", zp.reshape(()), elem), None)
        return (self.g.initializer(f"{name}.scale", s), self.g.int_initializer(f"{name}.zero_point", zp, elem),
                q.dim)

    def quantized_constant(self, value: torch.Tensor, q: FakeQuantizer, hint: str) -> str:
        """A parameter read through an activation quantizer (ViT's position embedding): stored as integers."""
        self.emitted.add(id(q))
        if not self.quantized:
            return self.g.initializer(hint, value.detach().float().cpu().numpy())
        name = self.name_of(q)
        values = grid_values(q, value, name)
        if q.dim is not None:
            raise ExportError(f"{name}: a per-channel quantizer on a constant cannot be exported")
        self._form("activation")
        scale, zp, _ = self._qparams(q, name)
        ints = self.g.int_initializer(f"{hint}.qvalues", values, container_type(8, q.bit_type.signed))
        return self.g.op("DequantizeLinear", [ints, scale, zp], hint)

    def log2_grid(self, x: str, bits: int, name: str) -> str:
        """2^-round(-log2 x) on [0, 2^b - 1], 0 below the grid (log2_quantize)."""
        g = self.g
        clamped = g.op("Max", [x, g.const(1e-30)], name)
        q = g.op("Round", [g.op("Neg", [self.log2(clamped, name)], name)], name)
        out = g.op("Pow", [g.const(2.0), g.op("Neg", [g.op("Clip", [q, g.const(0.0), g.const(2.0**bits - 1)],
                                                                 name)], name)], name)
        below = g.op("GreaterOrEqual", [q, g.const(2.0**bits)], name)
        return g.op("Where", [below, g.const(0.0), out], name)

    # -- weights and the layers that use them --------------------------------------------------------------------

    def weight(self, layer: QLinear | QConv2d, float_input: bool = False) -> tuple[str, np.ndarray | None]:
        """The layer's weight as DequantizeLinear of an integer initializer, and the bias correction's offsets.

        ``float_input``: the layer reads a tensor that is not one Q/DQ-quantized activation. ONNX Runtime 1.32
        then turns DequantizeLinear→MatMul into MatMulNBits, which by default quantizes the float input to int8 on
        the fly (session.qdq_matmulnbits_accuracy_level 4): not what the model computes. The weight is then
        written as a unit-scale DequantizeLinear and a Mul by the per-row scales (the same values bit for bit),
        which it leaves a float MatMul.
        """
        name = self.name_of(layer)
        self.emitted.add(id(layer.weight_quantizer))
        if not self.quantized:
            return self.g.initializer(f"{name}.weight", layer.weight.detach().float().cpu().numpy()), None
        grid = weight_grid(layer, name)
        elem = container_type(grid.bits, grid.signed)
        kind = f"{grid.bits}-bit {'signed' if grid.signed else 'unsigned'}"
        self.containers[kind] = f"{'int' if grid.signed else 'uint'}{container_bits(grid.bits)}"
        self._form("weight")
        scale = grid.scale if grid.gain is None else (grid.scale.astype(np.float64) * grid.gain).astype(np.float32)
        ints = self.g.int_initializer(f"{name}.weight.qvalues", grid.values, elem)
        zp = self.g.int_initializer(f"{name}.weight.zero_point", grid.zero_point, elem)
        if float_input:
            unit = self.g.op("DequantizeLinear", [ints, self.g.const(np.ones(len(scale)), np.float32), zp],
                             f"{name}.weight", axis=0)
            rows = self.g.initializer(f"{name}.weight.row_scale", scale.reshape((-1,) + (1,) * (grid.values.ndim - 1)))
            w = self.g.op("Mul", [unit, rows], f"{name}.weight")
        else:
            s = self.g.initializer(f"{name}.weight.scale", scale)
            w = self.g.op("DequantizeLinear", [ints, s, zp], f"{name}.weight", axis=0)
        if grid.offset is None:
            return w, None
        self._form("bias_correction")
        return w, grid.offset.astype(np.float32)

    def linear(self, x: str, layer: nn.Module) -> str:
        """x·Wᵀ (+ the bias correction's c·Σx) + b over the last axis, for a QLinear (or plain Linear in FP)."""
        if not isinstance(layer, QLinear):
            raise ExportError(f"{self.name_of(layer)}: {type(layer).__name__} is not a quantized Linear")
        name = self.name_of(layer)
        w, offset = self.weight(layer, float_input=not self._per_tensor_dq(x))
        x = self._unfused(x)
        y = self.g.op("MatMul", [x, self.g.op("Transpose", [w], name, perm=[1, 0])], name)
        if layer.bias is not None:
            y = self._add_bias(y, self.g.initializer(f"{name}.bias", _np(layer.bias)), name)
        if offset is not None:
            total = self.g.op("ReduceSum", [x, self.g.const([-1], np.int64)], name, keepdims=1)
            y = self.g.op("Add", [y, self.g.op("Mul", [total, self.g.initializer(f"{name}.offset", offset)],
                                               name)], name)
        return y

    def _add_bias(self, y: str, bias: str, name: str) -> str:
        """y + bias as a Sum node: ONNX Runtime 1.32 fuses an Add of a constant into the MatMul/Conv before it and
        then rounds the float bias to int32 at scale s_x·s_w (its WeightBiasQuantization), which the model does
        not do; it leaves a Sum alone."""
        return self.g.op("Sum", [y, bias], name)

    def conv(self, x: str, layer: nn.Module) -> str:
        """Conv2d with the integer weight (+ the bias correction's c times each window's input sum)."""
        if not isinstance(layer, QConv2d):
            raise ExportError(f"{self.name_of(layer)}: {type(layer).__name__} is not a quantized Conv2d")
        name = self.name_of(layer)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ExportError(f"{name}: only zero padding given as numbers can be exported (padding="
                              f"{layer.padding!r}, padding_mode={layer.padding_mode!r})")
        geometry = {"strides": list(layer.stride), "dilations": list(layer.dilation),
                    "pads": [*layer.padding, *layer.padding], "kernel_shape": list(layer.kernel_size)}
        w, offset = self.weight(layer)
        x = self._unfused(x)
        y = self.g.op("Conv", [x, w], name, group=layer.groups, **geometry)
        if layer.bias is not None:
            y = self._add_bias(y, self.g.initializer(f"{name}.bias", _np(layer.bias).reshape(-1, 1, 1)), name)
        if offset is None:
            return y
        groups, per_group = layer.groups, layer.out_channels // layer.groups
        ones = np.ones((groups, layer.in_channels // groups, *layer.kernel_size), np.float32)
        window_sums = self.g.op("Conv", [x, self.g.initializer(f"{name}.window_ones", ones)], f"{name}.offset",
                                group=groups, **geometry)  # [B, groups, H', W']
        if groups > 1:  # each output channel takes its group's sum
            index = np.arange(layer.out_channels, dtype=np.int64) // per_group
            window_sums = self.g.op("Gather", [window_sums, self.g.const(index, np.int64)], name, axis=1)
        c = self.g.initializer(f"{name}.offset", offset.reshape(1, -1, 1, 1))
        return self.g.op("Add", [y, self.g.op("Mul", [window_sums, c], name)], name)

    # -- normalization and softmax -------------------------------------------------------------------------------

    def layer_norm(self, x: str, ln: nn.LayerNorm, in_q: FakeQuantizer | None, out_q: FakeQuantizer | None) -> str:
        """QIntLayerNorm: the integer algorithm when it runs in integer mode, else a float LayerNormalization."""
        name = self.name_of(ln)
        use_int = isinstance(ln, QIntLayerNorm) and ln.use_int and in_q is not None and out_q is not None
        if self.quantized and use_int:
            if not isinstance(in_q, FakeQuantizer) or not isinstance(out_q, FakeQuantizer) or out_q.dim is not None:
                raise ExportError(f"{name}: integer LayerNorm needs uniform input and per-tensor output quantizers")
            return self.int_layer_norm(x, in_q, out_q, ln, name)
        if len(ln.normalized_shape) != 1:
            raise ExportError(f"{name}: only a LayerNorm over the last axis can be exported")
        self._form("layer_norm")
        inputs = [x, self.g.initializer(f"{name}.weight", _np(ln.weight))]
        if ln.bias is not None:
            inputs.append(self.g.initializer(f"{name}.bias", _np(ln.bias)))
        return self.g.op("LayerNormalization", inputs, name, axis=-1, epsilon=float(ln.eps))

    def int_layer_norm(self, x: str, in_q: FakeQuantizer, out_q: FakeQuantizer, ln: nn.LayerNorm,
                       name: str) -> str:
        """evolq_pl.quant.layers.int_layer_norm op by op: every value an integer or a dyadic number in float32.

        All arithmetic stays in float32 as in PyTorch, so nothing can overflow as an int32 port does (C·Σx² of
        8-bit PTF inputs reaches ~2.4e12 at C = 768); the float32 sums are exact while they stay below 2^24.
        """
        self._form("int_layer_norm")
        g = self.g
        in_scale = in_q.scale.detach().float().cpu()
        s_min = in_scale.min()
        channels = ln.normalized_shape[0]
        ratio = torch.round(in_scale / s_min)  # the same float32 ops as the layer, on constants
        std_unit = s_min / channels
        out_scale = g.const(float(out_q.scale.detach().float()))
        x_q = g.op("Mul", [g.op("Round", [g.op("Div", [x, g.initializer(f"{name}.in_scale", in_scale.numpy())],
                                                name)], name), g.initializer(f"{name}.ratio", ratio.numpy())], name)
        axes = g.const([-1], np.int64)
        total = g.op("ReduceSum", [x_q, axes], name, keepdims=1)
        squares = g.op("ReduceSum", [g.op("Mul", [x_q, x_q], name), axes], name, keepdims=1)
        mean = g.op("Mul", [g.op("Div", [total, g.const(float(channels))], name), g.const(float(s_min))], name)
        var_int = g.op("Max", [g.op("Sub", [g.op("Mul", [g.const(float(channels)), squares], name),
                                            g.op("Mul", [total, total], name)], name), g.const(0.0)], name)
        std = g.op("Max", [g.op("Mul", [g.const(float(std_unit)), g.op("Sqrt", [var_int], name)], name),
                           g.const(TINY)], name)
        gamma, beta = g.initializer(f"{name}.weight", _np(ln.weight)), g.initializer(f"{name}.bias", _np(ln.bias))
        a = g.op("Div", [g.op("Mul", [g.op("Div", [g.const(float(s_min)), std], name), gamma], name), out_scale],
                 name)
        a_abs = g.op("Max", [g.op("Abs", [a], name), g.const(TINY)], name)
        n = g.op("Clip", [g.op("Sub", [g.const(7.0), self.floor_log2(a_abs, name)], name), g.const(0.0),
                          g.const(float(INT_LN_MAX_SHIFT))], name)
        pow_n = g.op("Pow", [g.const(2.0), n], name)
        m = g.op("Clip", [g.op("Floor", [g.op("Mul", [a_abs, pow_n], name)], name), g.const(0.0),
                          g.const(float(INT_LN_MAX_MULTIPLIER))], name)
        shift = g.op("Mul", [g.op("Div", [mean, std], name), gamma], name)
        b = g.op("Round", [g.op("Mul", [g.op("Div", [g.op("Sub", [beta, shift], name), out_scale], name), pow_n],
                                name)], name)
        acc = g.op("Add", [g.op("Mul", [g.op("Mul", [g.op("Sign", [a], name), m], name), x_q], name), b], name)
        return g.op("Mul", [g.op("Round", [g.op("Div", [acc, pow_n], name)], name), out_scale], name)

    def softmax(self, x: str, sm: nn.Module, in_q: FakeQuantizer | None) -> str:
        """QSoftmax over the last axis: FP softmax then its quantizer (uniform/log2), or log-int-softmax."""
        name = self.name_of(sm)
        if not isinstance(sm, QSoftmax):
            raise ExportError(f"{name}: {type(sm).__name__} is not a QSoftmax")
        if sm.mode == "lis" and self.quantized:
            if not isinstance(in_q, FakeQuantizer) or in_q.dim is not None:
                raise ExportError(f"{name}: log-int-softmax needs a per-tensor uniform quantizer on its input")
            self.emitted.add(id(sm.quantizer))
            self._form("softmax_lis")
            out = self.log_int_softmax(x, float(in_q.scale), sm.quantizer.bit_type.bits, name)
            self.outputs[self.name_of(sm.quantizer)] = out
            return out
        if self.quantized:
            self._form("softmax_uniform" if sm.mode == "uniform" else "softmax_log2")
        return self.quantize(self.g.op("Softmax", [self._unfused(x, per_tensor=True)], name, axis=-1), sm.quantizer)

    def log_int_softmax(self, x: str, scale: float, bits: int, name: str) -> str:
        """evolq_pl.quant.functional.log_int_softmax op by op (I-BERT integer exp, then a log2 grid)."""
        g = self.g
        coef = (0.35815147, 0.96963238 / 0.35815147, 1.0 / 0.35815147)
        n = 30
        x0_int = math.floor(-0.6931 / scale)
        b_int, c_int = math.floor(coef[1] / scale), math.floor(coef[2] / scale**2)
        axes = g.const([-1], np.int64)
        x_int = g.op("Round", [g.op("Div", [x, g.const(scale)], name)], name)
        x_int = g.op("Sub", [x_int, g.op("ReduceMax", [x_int, axes], name, keepdims=1)], name)
        x_int = g.op("Max", [x_int, g.const(float(n * x0_int))], name)
        q = g.op("Floor", [g.op("Div", [x_int, g.const(float(x0_int))], name)], name)
        r = g.op("Sub", [x_int, g.op("Mul", [g.const(float(x0_int)), q], name)], name)
        poly = g.op("Add", [g.op("Mul", [r, g.op("Add", [r, g.const(float(b_int))], name)], name),
                            g.const(float(c_int))], name)
        scaled = g.op("Mul", [poly, g.op("Pow", [g.const(2.0), g.op("Sub", [g.const(float(n)), q], name)], name)],
                      name)
        exp_int = g.op("Max", [g.op("Floor", [scaled], name), g.const(0.0)], name)
        total = g.op("ReduceSum", [exp_int, axes], name, keepdims=1)
        ratio = g.op("Round", [g.op("Div", [total, g.op("Max", [exp_int, g.const(1.0)], name)], name)], name)
        ratio = g.op("Max", [ratio, g.const(1.0)], name)
        floor_log = self.floor_log2(ratio, name)
        big = g.op("Pow", [g.const(2.0), floor_log], name)
        up = g.op("GreaterOrEqual", [g.op("Sub", [ratio, big], name), g.op("Div", [big, g.const(2.0)], name)], name)
        k = g.op("Add", [floor_log, g.op("Cast", [up], name, to=TensorProto.FLOAT)], name)
        out = g.op("Pow", [g.const(2.0), g.op("Neg", [g.op("Clip", [k, g.const(0.0), g.const(2.0**bits - 1)],
                                                                 name)], name)], name)
        zero = g.op("Or", [g.op("GreaterOrEqual", [k, g.const(2.0**bits)], name),
                           g.op("Equal", [exp_int, g.const(0.0)], name)], name)
        return g.op("Where", [zero, g.const(0.0), out], name)

    # -- small exact helpers -------------------------------------------------------------------------------------

    def log2(self, x: str, name: str) -> str:
        """log2 x as ln x / ln 2 (ONNX has no Log2; within an ulp or two of torch.log2)."""
        return self.g.op("Mul", [self.g.op("Log", [x], name), self.g.const(1.0 / math.log(2.0))], name)

    def floor_log2(self, x: str, name: str) -> str:
        """floor(log2 x) for x > 0, exact: the ln-based estimate is corrected by comparing with powers of two."""
        g = self.g
        k = g.op("Floor", [self.log2(x, name)], name)
        k = g.op("Sub", [k, g.op("Cast", [g.op("Greater", [g.op("Pow", [g.const(2.0), k], name), x], name)], name,
                                 to=TensorProto.FLOAT)], name)
        next_power = g.op("Pow", [g.const(2.0), g.op("Add", [k, g.const(1.0)], name)], name)
        above = g.op("Cast", [g.op("LessOrEqual", [next_power, x], name)], name, to=TensorProto.FLOAT)
        return g.op("Add", [k, above], name)

    # -- parameter-free modules ----------------------------------------------------------------------------------

    def activation(self, x: str, act: nn.Module) -> str:
        """GELU, Hardswish, ReLU, ReLU6, SiLU or Identity; any other activation is refused by name."""
        name = self.name_of(act)
        g = self.g
        if isinstance(act, nn.Identity | nn.Dropout):
            return x
        if isinstance(act, nn.GELU):
            return g.op("Gelu", [x], name, approximate=act.approximate)
        if isinstance(act, nn.Hardswish):  # x·min(max(x + 3, 0), 6)/6, PyTorch's order of operations
            clipped = g.op("Clip", [g.op("Add", [x, g.const(3.0)], name), g.const(0.0), g.const(6.0)], name)
            return g.op("Div", [g.op("Mul", [x, clipped], name), g.const(6.0)], name)
        if isinstance(act, nn.ReLU):
            return g.op("Relu", [x], name)
        if isinstance(act, nn.ReLU6):  # MobileNetV2
            return g.op("Clip", [x, g.const(0.0), g.const(6.0)], name)
        if isinstance(act, nn.SiLU):
            return g.op("Mul", [x, g.op("Sigmoid", [x], name)], name)
        raise ExportError(f"{name}: activation {type(act).__name__} cannot be exported (supported: GELU, "
                          "Hardswish, ReLU, ReLU6, SiLU, Identity); add it to evolq_pl.export.emitters.Emitter.activation")

    def passthrough(self, x: str, module: nn.Module) -> str:
        """Modules that are identities in eval (Identity, Dropout) or a LayerScale; anything else is refused."""
        if isinstance(module, nn.Identity | nn.Dropout):
            return x
        gamma = getattr(module, "gamma", None)
        if type(module).__name__ == "LayerScale" and isinstance(gamma, torch.Tensor):
            return self.g.op("Mul", [x, self.g.initializer(f"{self.name_of(module)}.gamma", _np(gamma))],
                             self.name_of(module))
        raise ExportError(f"{self.name_of(module)}: {type(module).__name__} cannot be exported here (only "
                          "Identity, Dropout or LayerScale)")

    def matmul(self, a: str, b: str, hint: str) -> str:
        return self.g.op("MatMul", [a, b], hint)

    def reshape(self, x: str, shape: list[int], hint: str) -> str:
        """Reshape where 0 keeps the input's size (the batch) and -1 is inferred."""
        return self.g.op("Reshape", [x, self.g.const(shape, np.int64)], hint)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
