"""Swin Transformer (``QuantSwin``) as an ONNX graph, in the order of its forward (evolq_pl.models.swin).

Every shape is static (the model's image size is fixed), so cyclic shifts are two Slices and a Concat per axis,
window partition and reverse are Reshape/Transpose, and the relative position bias and shift mask are float
initializers added as the model adds them.
"""

from __future__ import annotations

import numpy as np

from evolq_pl.export.emitters import Emitter
from evolq_pl.export.registry import register_exporter
from evolq_pl.models.swin import QPatchMerging, QSwinBlock, QuantSwin, QWindowAttention
from evolq_pl.quant.quantizer import FakeQuantizer


@register_exporter(QuantSwin, "SwinTransformer (Swin-T/S/B)")
def export_swin(e: Emitter, m: QuantSwin, images: str) -> str:
    g = e.g
    x = e.quantize(images, m.q_input)
    x = e.quantize(g.op("Transpose", [e.conv(x, m.patch_proj)], "patch_embed", perm=[0, 2, 3, 1]), m.q_patch)
    x = e.quantize(e.layer_norm(x, m.patch_norm, m.q_patch, m.q_embed), m.q_embed)
    in_q = m.q_embed
    for stage in m.stages:
        if stage.downsample is not None:
            x = _merge(e, stage.downsample, x, in_q)
            in_q = stage.downsample.q_out
        for block in stage.blocks:
            x = _block(e, block, x, in_q)
            in_q = block.q_out
    x = e.quantize(e.layer_norm(x, m.norm, in_q, m.q_norm), m.q_norm)
    x = e.quantize(g.op("ReduceMean", [x, g.const([1, 2], np.int64)], "pool", keepdims=0), m.q_pool)
    return e.quantize(e.linear(x, m.head), m.q_logits)


def _roll(e: Emitter, x: str, shifts: tuple[int, int], sizes: tuple[int, int], hint: str) -> str:
    """torch.roll over axes 1 and 2 of [B, H, W, C] with static sizes: out[i] = x[(i - shift) mod size]."""
    g = e.g
    for axis, shift, size in zip((1, 2), shifts, sizes, strict=True):
        cut = (size - shift) % size
        if cut == 0:
            continue
        parts = [g.op("Slice", [x, g.const([start], np.int64), g.const([end], np.int64), g.const([axis], np.int64)],
                      hint) for start, end in ((cut, size), (0, cut))]
        x = g.op("Concat", parts, hint, axis=axis)
    return x


def _block(e: Emitter, b: QSwinBlock, x: str, in_q: FakeQuantizer) -> str:
    g = e.g
    name = e.name_of(b)
    (h, w), (wh, ww), shift = b.input_resolution, b.window_size, b.shift_size
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    y = e.quantize(e.layer_norm(x, b.norm1, in_q, b.q_ln1), b.q_ln1)
    if any(shift):
        y = _roll(e, y, (-shift[0], -shift[1]), (h, w), f"{name}.shift")
    if (hp, wp) != (h, w):
        y = g.op("Pad", [y, g.const([0, 0, 0, 0, 0, hp - h, wp - w, 0], np.int64)], f"{name}.pad")
    channels = b.norm1.normalized_shape[0]
    y = g.op("Transpose", [e.reshape(y, [-1, hp // wh, wh, wp // ww, ww, channels], f"{name}.windows")],
             f"{name}.windows", perm=[0, 1, 3, 2, 4, 5])
    y = _attention(e, b.attn, e.reshape(y, [-1, wh * ww, channels], f"{name}.windows"))
    y = g.op("Transpose", [e.reshape(y, [-1, hp // wh, wp // ww, wh, ww, channels], f"{name}.merge")],
             f"{name}.merge", perm=[0, 1, 3, 2, 4, 5])
    y = e.reshape(y, [-1, hp, wp, channels], f"{name}.merge")
    if (hp, wp) != (h, w):
        y = g.op("Slice", [y, g.const([0, 0], np.int64), g.const([h, w], np.int64), g.const([1, 2], np.int64)],
                 f"{name}.unpad")
    if any(shift):
        y = _roll(e, y, shift, (h, w), f"{name}.unshift")
    x = e.quantize(g.op("Add", [x, y], f"{name}.residual1"), b.q_res1)
    y = e.quantize(e.layer_norm(x, b.norm2, b.q_res1, b.q_ln2), b.q_ln2)
    y = e.quantize(e.activation(e.linear(y, b.fc1), b.act), b.q_fc1)
    y = e.quantize(e.linear(e.passthrough(y, b.mlp_norm), b.fc2), b.q_fc2)
    return e.quantize(g.op("Add", [x, y], f"{name}.residual2"), b.q_out)


def _attention(e: Emitter, a: QWindowAttention, x: str) -> str:
    g = e.g
    name = e.name_of(a)
    n = a.window_area
    qkv = e.quantize(e.linear(x, a.qkv), a.q_qkv)
    qkv = g.op("Transpose", [e.reshape(qkv, [0, 0, 3, a.num_heads, -1], name)], name, perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("Squeeze", [t, g.const([0], np.int64)], name)
               for t in g.op("Split", [qkv], name, outputs=3, axis=0, num_outputs=3))
    scores = e.matmul(q, g.op("Transpose", [k], name, perm=[0, 1, 3, 2]), f"{name}.scores")
    scores = e.quantize(g.op("Mul", [scores, g.const(a.scale)], f"{name}.scores"), a.q_scores)
    bias = g.initializer(f"{name}.position_bias", a.position_bias().detach().float().cpu().numpy())
    scores = e.quantize(g.op("Add", [scores, bias], f"{name}.scores"), a.q_biased)
    if a.mask is not None:
        windows = a.mask.shape[0]
        mask = g.initializer(f"{name}.mask", a.mask.detach().float().cpu().numpy()[None, :, None])
        scores = e.reshape(g.op("Add", [e.reshape(scores, [-1, windows, a.num_heads, n, n], name), mask], name),
                           [-1, a.num_heads, n, n], name)
    attn = e.softmax(scores, a.softmax, a.q_biased)
    out = g.op("Transpose", [e.matmul(attn, v, f"{name}.attn_v")], name, perm=[0, 2, 1, 3])
    out = e.quantize(e.reshape(out, [0, 0, a.proj.in_features], name), a.q_attn_v)
    return e.quantize(e.linear(out, a.proj), a.q_proj)


def _merge(e: Emitter, d: QPatchMerging, x: str, in_q: FakeQuantizer) -> str:
    """2x2 neighbours side by side, integer LN on the input's PTF grid tiled over them, reduction."""
    g = e.g
    name = e.name_of(d)
    (h, w), channels = d.input_resolution, d.reduction.in_features // 4
    if h % 2 or w % 2:
        x = g.op("Pad", [x, g.const([0, 0, 0, 0, 0, h % 2, w % 2, 0], np.int64)], f"{name}.pad")
        h, w = h + h % 2, w + w % 2
    x = g.op("Transpose", [e.reshape(x, [-1, h // 2, 2, w // 2, 2, channels], name)], name, perm=[0, 1, 3, 4, 2, 5])
    x = e.reshape(x, [-1, h // 2, w // 2, 4 * channels], name)
    tiled = FakeQuantizer(in_q.bit_type, "minmax", channels=4 * channels, dim=-1)
    tiled.scale.copy_(in_q.scale.detach().cpu().repeat(4))
    x = e.quantize(e.layer_norm(x, d.norm, tiled, d.q_norm), d.q_norm)
    return e.quantize(e.linear(x, d.reduction), d.q_out)
