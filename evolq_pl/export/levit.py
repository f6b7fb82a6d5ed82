"""LeViT (``QuantLevit``) as an ONNX graph, in the order of its forward (evolq_pl.models.levit).

BatchNorm is already folded into the quantized Conv/Linear layers, so the graph has none; the attention biases are
gathered once at export (a float initializer [heads, N_q, N_k], as the model adds them in float).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from evolq_pl.export.emitters import Emitter
from evolq_pl.export.errors import ExportError
from evolq_pl.export.registry import register_exporter
from evolq_pl.models.levit import (
    QLevitAttention,
    QLevitAttentionDownsample,
    QLevitBlock,
    QLevitDownsample,
    QLevitMlp,
    QuantLevit,
    _QAttentionCore,
)
from evolq_pl.quant.layers import QConv2d


@register_exporter(QuantLevit, "Levit (LeViT)")
def export_levit(e: Emitter, m: QuantLevit, images: str) -> str:
    g = e.g
    x = e.quantize(images, m.q_input)
    for name in m.stem.order:
        layer = getattr(m.stem, name)
        x = e.conv(x, layer) if isinstance(layer, QConv2d) else e.activation(x, layer)
        x = e.quantize(x, getattr(m.stem, f"q_{name}"))
    x = e.quantize(x, m.q_embed)
    x = g.op("Transpose", [e.reshape(x, [0, 0, -1], "embed")], "embed", perm=[0, 2, 1])  # [B, N, C]
    for unit in m.units:
        x = _block(e, unit, x) if isinstance(unit, QLevitBlock) else _downsample(e, unit, x)
    return _head(e, m, x)


def _block(e: Emitter, b: QLevitBlock, x: str) -> str:
    name = e.name_of(b)
    x = e.quantize(e.g.op("Add", [x, _self_attention(e, b.attn, x)], f"{name}.residual1"), b.q_res1)
    return e.quantize(e.g.op("Add", [x, _mlp(e, b.mlp, x)], f"{name}.residual2"), b.q_out)


def _downsample(e: Emitter, d: QLevitDownsample, x: str) -> str:
    x = _attention_downsample(e, d.attn_downsample, x)
    return e.quantize(e.g.op("Add", [x, _mlp(e, d.mlp, x)], f"{e.name_of(d)}.residual"), d.q_out)


def _mlp(e: Emitter, mlp: QLevitMlp, x: str) -> str:
    x = e.quantize(e.activation(e.quantize(e.linear(x, mlp.fc1), mlp.q_fc1), mlp.act), mlp.q_act)
    return e.quantize(e.linear(x, mlp.fc2), mlp.q_fc2)


def _heads_first(e: Emitter, x: str, hint: str) -> str:
    """[B, N, heads, d] -> [B, heads, N, d]."""
    return e.g.op("Transpose", [x], hint, perm=[0, 2, 1, 3])


def _self_attention(e: Emitter, a: QLevitAttention, x: str) -> str:
    g = e.g
    name = e.name_of(a)
    qkv = e.reshape(e.linear(x, a.qkv), [0, 0, a.num_heads, -1], name)
    sizes = g.const([a.key_dim, a.key_dim, a.val_dim], np.int64)
    q, k, v = (_heads_first(e, t, name) for t in g.op("Split", [qkv, sizes], name, outputs=3, axis=3))
    return _attend(e, a, q, k, v)


def _attention_downsample(e: Emitter, a: QLevitAttentionDownsample, x: str) -> str:
    g = e.g
    name = e.name_of(a)
    kv = e.reshape(e.linear(x, a.kv), [0, 0, a.num_heads, -1], name)
    k, v = (_heads_first(e, t, name)
            for t in g.op("Split", [kv, g.const([a.key_dim, a.val_dim], np.int64)], name, outputs=2, axis=3))
    q = e.reshape(e.linear(_subsample(e, a.down, x, a.kv.in_features, name), a.query), [0, -1, a.num_heads, a.key_dim], name)
    return _attend(e, a, _heads_first(e, q, name), k, v)


def _subsample(e: Emitter, down: nn.Module, x: str, channels: int, name: str) -> str:
    """timm's LeViT token subsampling (``Downsample``): view [B, H, W, C], keep every stride-th row and column,
    back to [B, N', C]."""
    if not hasattr(down, "resolution") or not hasattr(down, "stride") or getattr(down, "pool", None) is not None:
        raise ExportError(f"{name}: only timm's strided LeViT Downsample without pooling can be exported")
    g = e.g
    h, w = down.resolution
    x = e.reshape(x, [0, h, w, -1], name)
    x = g.op("Slice", [x, g.const([0, 0], np.int64), g.const([h, w], np.int64), g.const([1, 2], np.int64),
                       g.const([down.stride, down.stride], np.int64)], name)
    return e.reshape(x, [0, -1, channels], name)


def _attend(e: Emitter, a: _QAttentionCore, q: str, k: str, v: str) -> str:
    g = e.g
    name = e.name_of(a)
    q, k, v = e.quantize(q, a.q_q), e.quantize(k, a.q_k), e.quantize(v, a.q_v)
    scores = e.quantize(e.matmul(q, g.op("Transpose", [k], name, perm=[0, 1, 3, 2]), f"{name}.scores"), a.q_scores)
    bias = g.initializer(f"{name}.attention_bias", a.attention_bias().detach().float().cpu().numpy())
    scores = g.op("Add", [g.op("Mul", [scores, g.const(a.scale)], f"{name}.scores"), bias], f"{name}.scores")
    attn = e.softmax(e.quantize(scores, a.q_biased), a.softmax, a.q_biased)
    out = g.op("Transpose", [e.matmul(attn, v, f"{name}.attn_v")], name, perm=[0, 2, 1, 3])
    out = e.quantize(e.reshape(out, [0, 0, a.val_attn_dim], name), a.q_attn_v)
    out = e.quantize(e.activation(out, a.act), a.q_act)
    return e.quantize(e.linear(out, a.proj), a.q_proj)


def _head(e: Emitter, m: QuantLevit, x: str) -> str:
    g = e.g
    x = e.quantize(g.op("ReduceMean", [e.quantize(x, m.q_post), g.const([1], np.int64)], "pool", keepdims=0),
                   m.q_mean)
    logits = e.linear(x, m.head)
    if m.head_dist is not None:
        distilled = e.quantize(e.linear(x, m.head_dist), m.q_head_dist)
        logits = g.op("Div", [g.op("Add", [e.quantize(logits, m.q_head), distilled], "head"), g.const(2.0)], "head")
    return e.quantize(logits, m.q_logits)
