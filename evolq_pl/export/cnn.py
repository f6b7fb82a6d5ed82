"""CNNs (``QuantCNN``: ResNet, MobileNetV2) as an ONNX graph, in the order of their forward (evolq_pl.models.cnn).

BatchNorm is already folded into the quantized convolutions, so the graph has none. Max pooling and the global
average pooling are float ops on the dequantized tensor, as the model computes them.
"""

from __future__ import annotations

import numpy as np
from timm.layers import SelectAdaptivePool2d
from torch import nn

from evolq_pl.export.emitters import Emitter
from evolq_pl.export.errors import ExportError
from evolq_pl.export.registry import register_exporter
from evolq_pl.models.cnn import QConvAct, QResidualBlock, QuantCNN


@register_exporter(QuantCNN, "CNN (ResNet, MobileNetV2)")
def export_cnn(e: Emitter, m: QuantCNN, images: str) -> str:
    x = e.quantize(images, m.q_input)
    for unit in (*m.stem, *m.blocks, *m.neck):
        x = _unit(e, unit, x)
    x = _global_average(e, m.pool, x)
    x = e.quantize(x, m.q_pool)
    return e.quantize(e.linear(x, m.head), m.q_logits)


def _unit(e: Emitter, unit: nn.Module, x: str) -> str:
    if isinstance(unit, QConvAct):
        return e.quantize(e.activation(e.conv(x, unit.conv), unit.act), unit.q_out)
    if isinstance(unit, QResidualBlock):
        return _block(e, unit, x)
    if isinstance(unit, nn.MaxPool2d):
        return _max_pool(e, unit, x)
    raise ExportError(f"{e.name_of(unit)}: {type(unit).__name__} cannot be exported in a CNN")


def _block(e: Emitter, b: QResidualBlock, x: str) -> str:
    h = x
    for unit in b.body:
        h = _unit(e, unit, h)
    if not b.skip:
        return h
    shortcut = _unit(e, b.shortcut, x) if b.shortcut is not None else x
    h = e.g.op("Add", [h, shortcut], f"{e.name_of(b)}.residual")
    return e.quantize(e.activation(h, b.post_act), b.q_out)


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


def _max_pool(e: Emitter, pool: nn.MaxPool2d, x: str) -> str:
    pads = _pair(pool.padding)
    return e.g.op("MaxPool", [x], e.name_of(pool), kernel_shape=_pair(pool.kernel_size),
                  strides=_pair(pool.stride or pool.kernel_size), pads=[*pads, *pads],
                  dilations=_pair(pool.dilation), ceil_mode=int(pool.ceil_mode))


def _global_average(e: Emitter, pool: SelectAdaptivePool2d, x: str) -> str:
    if pool.pool_type != "avg":
        raise ExportError(f"global_pool={pool.pool_type!r} cannot be exported (avg)")
    return e.g.op("ReduceMean", [x, e.g.const([2, 3], np.int64)], "pool", keepdims=0)
