"""ViT/DeiT (``QuantViT``) as an ONNX graph, in the order of its forward (evolq_pl.models.vit)."""

from __future__ import annotations

import numpy as np

from evolq_pl.export.emitters import Emitter
from evolq_pl.export.errors import ExportError
from evolq_pl.export.registry import register_exporter
from evolq_pl.models.vit import QAttention, QBlock, QuantViT
from evolq_pl.quant.quantizer import FakeQuantizer


@register_exporter(QuantViT, "VisionTransformer (ViT, DeiT)")
def export_vit(e: Emitter, m: QuantViT, images: str) -> str:
    g = e.g
    x = e.quantize(images, m.q_input)
    x = e.conv(x, m.patch_proj)  # [B, D, gh, gw] -> tokens [B, N, D]
    x = g.op("Transpose", [e.reshape(x, [0, 0, -1], "patch_embed")], "patch_embed", perm=[0, 2, 1])
    x = e.quantize(e.passthrough(x, m.patch_norm), m.q_patch)
    dim = m.cls_token.shape[-1]
    batch = g.op("Shape", [x], "cls_token", start=0, end=1)
    size = g.op("Concat", [batch, g.const([1, dim], np.int64)], "cls_token", axis=0)
    cls = g.op("Expand", [g.initializer("cls_token", m.cls_token.detach().float().cpu().numpy()), size], "cls_token")
    x = e.quantize(g.op("Concat", [cls, x], "embed", axis=1), m.q_embed)
    x = g.op("Add", [x, e.quantized_constant(m.pos_embed, m.q_pos, "pos_embed")], "embed")
    x = e.quantize(x, m.q_block_in)
    in_q = m.q_block_in
    for block in m.blocks:
        x = _block(e, block, x, in_q)
        in_q = block.q_out
    return _head(e, m, x, in_q)


def _block(e: Emitter, b: QBlock, x: str, in_q: FakeQuantizer) -> str:
    g = e.g
    name = e.name_of(b)
    h = e.quantize(e.layer_norm(x, b.norm1, in_q, b.q_ln1), b.q_ln1)
    a = e.passthrough(_attention(e, b.attn, h), b.ls1)
    x = e.quantize(g.op("Add", [a, x], f"{name}.residual1"), b.q_res1)
    h = e.quantize(e.layer_norm(x, b.norm2, b.q_res1, b.q_ln2), b.q_ln2)
    h = e.quantize(e.activation(e.linear(h, b.fc1), b.act), b.q_fc1)
    h = e.quantize(e.linear(e.passthrough(h, b.mlp_norm), b.fc2), b.q_fc2)
    return e.quantize(g.op("Add", [e.passthrough(h, b.ls2), x], f"{name}.residual2"), b.q_out)


def _attention(e: Emitter, a: QAttention, x: str) -> str:
    g = e.g
    name = e.name_of(a)
    qkv = e.quantize(e.linear(x, a.qkv), a.q_qkv)
    qkv = g.op("Transpose", [e.reshape(qkv, [0, 0, 3, a.num_heads, a.head_dim], name)], name, perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("Squeeze", [t, g.const([0], np.int64)], name)
               for t in g.op("Split", [qkv], name, outputs=3, axis=0, num_outputs=3))
    q, k = e.passthrough(q, a.q_norm), e.passthrough(k, a.k_norm)
    scores = e.matmul(q, g.op("Transpose", [k], name, perm=[0, 1, 3, 2]), f"{name}.scores")
    scores = e.quantize(g.op("Mul", [scores, g.const(a.scale)], f"{name}.scores"), a.q_scores)
    attn = e.softmax(scores, a.softmax, a.q_scores)
    out = g.op("Transpose", [e.matmul(attn, v, f"{name}.attn_v")], name, perm=[0, 2, 1, 3])
    out = e.quantize(e.passthrough(e.reshape(out, [0, 0, a.num_heads * a.head_dim], name), a.norm), a.q_attn_v)
    return e.quantize(e.linear(out, a.proj), a.q_proj)


def _head(e: Emitter, m: QuantViT, x: str, in_q: FakeQuantizer) -> str:
    g = e.g
    if m.global_pool == "token":  # LayerNorm is per token: normalise the class token alone, the same bits
        x = e.layer_norm(g.op("Gather", [x, g.const(0, np.int64)], "pool", axis=1), m.norm, in_q, m.q_norm)
    elif m.global_pool == "avg":
        x = e.layer_norm(x, m.norm, in_q, m.q_norm)
        x = g.op("Slice", [x, g.const([m.num_prefix_tokens], np.int64), g.const([2**62], np.int64),
                           g.const([1], np.int64)], "pool")
        x = g.op("ReduceMean", [x, g.const([1], np.int64)], "pool", keepdims=0)
    else:
        raise ExportError(f"global_pool={m.global_pool!r} cannot be exported (token or avg)")
    x = e.passthrough(e.quantize(x, m.q_norm), m.fc_norm)
    return e.quantize(e.linear(x, m.head), m.q_logits)
