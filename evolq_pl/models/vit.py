"""ViT and DeiT (timm ``VisionTransformer``) with quantizers at the reference's tensor map (§1.8).

timm is not forked: its Linear/Conv/LayerNorm parameters are taken over (shared) by quantized layers, and the
attention and block forwards are re-owned here because timm's fused attention hides the softmax.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from evolq_pl.models.base import QuantizedModel, SearchBlock
from evolq_pl.models.registry import register_family
from evolq_pl.quant import functional as F
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QIntLayerNorm, QLinear, QSoftmax
from evolq_pl.quant.quantizer import FakeQuantizer


def act_quantizer(cfg: QuantConfig, reuse_input: bool = False) -> FakeQuantizer:
    """Per-tensor activation quantizer (A in the tensor map). ``reuse_input``: its input is always a temporary
    (not a parameter, the images or a tensor read again), so inference may quantize it in place."""
    return FakeQuantizer(cfg.act_type, cfg.act_observer, reuse_input=reuse_input)


def ptf_quantizer(cfg: QuantConfig, channels: int, dim: int = -1, reuse_input: bool = False) -> FakeQuantizer:
    """Channel-wise PTF quantizer of residual sums / LayerNorm inputs, or a plain A quantizer without PTF."""
    if cfg.ptf:
        return FakeQuantizer(cfg.act_type, "ptf", channels=channels, dim=dim, reuse_input=reuse_input)
    return act_quantizer(cfg, reuse_input)


def qlinear(linear: nn.Linear, cfg: QuantConfig) -> QLinear:
    return QLinear.from_float(linear, cfg.weight_type, cfg.weight_observer, cfg.bias_correction)


class QAttention(nn.Module):
    """Multi-head self-attention with quantized qkv, scores, softmax, attn·v and projection.

    The probabilities must be materialised to be quantized, where timm's fused attention never writes them. On CPU
    the search's inference forwards therefore run the score-softmax-value part a few images at a time
    (``chunk_bytes`` of scores per chunk), so that each chunk's scores stay in cache between their passes; every
    op in it is per image and row, so the result has the same bits.
    """

    chunk_bytes = 2 << 20

    def __init__(self, attn: Attention, cfg: QuantConfig) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention is not supported by the quantized ViT")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv = qlinear(attn.qkv, cfg)
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.proj = qlinear(attn.proj, cfg)
        self.q_qkv = act_quantizer(cfg, reuse_input=True)
        self.q_scores = act_quantizer(cfg, reuse_input=True)
        self.softmax = QSoftmax(cfg.softmax, cfg.softmax_bits, cfg.act_observer)
        self.q_attn_v = act_quantizer(cfg, reuse_input=True)
        self.q_proj = act_quantizer(cfg, reuse_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.q_qkv(self.qkv(x)).reshape(b, n, 3, self.num_heads, self.head_dim)
        # one copy into (b, n, h, d) order, whether there is one chunk or several
        x = torch.cat([self._attend(c).transpose(1, 2) for c in qkv.split(self._images_per_chunk(qkv))])
        x = self.q_attn_v(self.norm(x.reshape(b, n, self.num_heads * self.head_dim)))
        return self.q_proj(self.proj(x))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ·scale)·v with the scores and probabilities quantized: (b, n, 3, h, d) -> (b, h, n, d)."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = self.q_scores((q @ k.transpose(-2, -1)).mul_(self.scale))  # in place: one temporary less
        attn = self.softmax(scores, self.q_scores)
        return attn.to(v.dtype) @ v

    def _images_per_chunk(self, qkv: torch.Tensor) -> int:
        """Images per chunk: all of them unless this is a quantized CPU inference forward with fixed quantizers (an
        observer must see the whole tensor; autograd, the reference formulas and FP mode keep the plain path)."""
        b, n = qkv.shape[:2]
        quantizers = (self.q_scores, self.softmax.quantizer)
        if (qkv.device.type != "cpu" or not self.q_scores.enabled or not F.inplace_ok(qkv)
                or any(getattr(q, "observing", False) or getattr(q, "scoring", False) for q in quantizers)):
            return b
        return max(1, self.chunk_bytes // (self.num_heads * n * n * 4))


def _add_into(tmp: torch.Tensor, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    """x + tmp, written over ``tmp`` on the quantized inference path, where ``tmp`` is a temporary the block owns:
    the same bits (IEEE addition commutes), without a fresh activation-sized buffer. With quantization off the
    block computes out of place, as timm does."""
    if (quantized and tmp.shape == x.shape and tmp.dtype == torch.promote_types(tmp.dtype, x.dtype)
            and tmp.is_contiguous() and F.inplace_ok(tmp, x)):
        return tmp.add_(x)
    return x + tmp


def _act_into(act: nn.Module, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    """The MLP activation, written over fc1's fresh output where it is a GELU on the quantized inference path: the
    same kernel, one activation-sized buffer less."""
    if quantized and type(act) is nn.GELU and F.inplace_ok(x):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def add_mlp_half(module: nn.Module, block: nn.Module, cfg: QuantConfig, dim: int) -> None:
    """The second half of a pre-norm block (ViT, Swin): integer LN, the MLP and the PTF-quantized residual sum.

    Registered on ``module`` last and in this order, which the quantization map and the export record follow.
    """
    module.norm2 = QIntLayerNorm.from_float(block.norm2, cfg.int_norm)
    module.q_ln2 = act_quantizer(cfg, reuse_input=True)
    module.fc1 = qlinear(block.mlp.fc1, cfg)
    module.act = block.mlp.act
    module.q_fc1 = act_quantizer(cfg, reuse_input=True)
    module.mlp_norm = block.mlp.norm
    module.fc2 = qlinear(block.mlp.fc2, cfg)
    module.q_fc2 = act_quantizer(cfg, reuse_input=True)
    module.q_out = ptf_quantizer(cfg, dim, reuse_input=True)


class QBlock(nn.Module):
    """Pre-norm transformer block; its last quantizer (``q_out``, PTF) feeds the next block's integer LN."""

    def __init__(self, block: Block, cfg: QuantConfig) -> None:
        super().__init__()
        if not isinstance(block.mlp, Mlp):
            raise ValueError(f"MLP type {type(block.mlp).__name__} is not supported by the quantized ViT")
        dim = block.norm1.normalized_shape[0]
        self.norm1 = QIntLayerNorm.from_float(block.norm1, cfg.int_norm)
        self.q_ln1 = act_quantizer(cfg, reuse_input=True)
        self.attn = QAttention(block.attn, cfg)
        self.ls1, self.ls2 = block.ls1, block.ls2
        self.q_res1 = ptf_quantizer(cfg, dim, reuse_input=True)
        add_mlp_half(self, block, cfg, dim)

    def forward(self, x: torch.Tensor, in_q: FakeQuantizer) -> torch.Tensor:
        h = self.q_ln1(self.norm1(x, in_q, self.q_ln1))
        x = self.q_res1(_add_into(self.ls1(self.attn(h)), x, self.attn.q_proj.enabled))
        h = self.q_ln2(self.norm2(x, self.q_res1, self.q_ln2))
        h = self.q_fc1(_act_into(self.act, self.fc1(h), self.q_fc1.enabled))
        h = self.q_fc2(self.fc2(self.mlp_norm(h)))
        return self.q_out(_add_into(self.ls2(h), x, self.q_fc2.enabled))


class QuantViT(QuantizedModel):
    """Fully quantized VisionTransformer: patch embedding, every block, final norm, head and logits."""

    def __init__(self, model: VisionTransformer, cfg: QuantConfig, model_name: str) -> None:
        super().__init__()
        self._check_supported(model)
        self.model_name, self.qconfig = model_name, cfg
        dim = model.embed_dim
        quantize_input = cfg.quantize_input
        if quantize_input is None:
            quantize_input = model_name.split(".")[0].startswith("deit")
        self.q_input = act_quantizer(cfg) if quantize_input else None
        self.patch_proj = QConv2d.from_float(model.patch_embed.proj, cfg.weight_type, cfg.weight_observer,
                                             cfg.bias_correction)
        self.patch_norm = model.patch_embed.norm
        self.q_patch = act_quantizer(cfg, reuse_input=True)
        self.cls_token, self.pos_embed = model.cls_token, model.pos_embed
        self.q_embed = act_quantizer(cfg, reuse_input=True)
        self.q_pos = act_quantizer(cfg)
        self.q_block_in = ptf_quantizer(cfg, dim, reuse_input=True)
        self.blocks = nn.ModuleList(QBlock(b, cfg) for b in model.blocks)
        self.norm = QIntLayerNorm.from_float(model.norm, cfg.int_norm)
        self.q_norm = act_quantizer(cfg, reuse_input=True)
        self.global_pool, self.num_prefix_tokens = model.global_pool, model.num_prefix_tokens
        self.fc_norm = model.fc_norm
        self.head = qlinear(model.head, cfg)
        self.q_logits = act_quantizer(cfg, reuse_input=True)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)

    @staticmethod
    def _check_supported(model: VisionTransformer) -> None:
        problems = []
        if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
            problems.append("a single class token with a position embedding that covers it")
        if model.dynamic_img_size or model.attn_pool is not None:
            problems.append("fixed image size and no attention pooling")
        if not isinstance(model.norm, nn.LayerNorm) or not isinstance(model.norm_pre, nn.Identity):
            problems.append("a final LayerNorm and no pre-norm")
        if not isinstance(model.head, nn.Linear):
            problems.append("a Linear classifier head")
        if not all(isinstance(b, Block) and isinstance(b.attn, Attention) for b in model.blocks):
            problems.append("plain timm Blocks with standard Attention")
        if problems:
            raise ValueError("unsupported VisionTransformer variant: the quantized ViT needs " + "; ".join(problems))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> quantized tokens entering block 0 (patch embedding, class token, position embedding)."""
        if self.q_input is not None:
            x = self.q_input(x)
        x = self.patch_proj(x).flatten(2).transpose(1, 2)
        x = self.q_patch(self.patch_norm(x))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.q_embed(x) + self.q_pos(self.pos_embed)
        return self.q_block_in(x)

    def _in_quantizer(self, index: int) -> FakeQuantizer:
        return self.q_block_in if index == 0 else self.blocks[index - 1].q_out

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x, self.blocks[-1].q_out, self.q_norm)
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(self.q_norm(x))  # quantized after pooling: the reference observes the class token only
        return self.q_logits(self.head(x))

    def forward_to(self, index: int, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i in range(index):
            x = self.blocks[i](x, self._in_quantizer(i))
        return x

    def forward_from(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        for i in range(index, len(self.blocks)):
            x = self.blocks[i](x, self._in_quantizer(i))
        return self.head_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, self.embed(x))

    def block_units(self, include_mlp: bool = False) -> list[SearchBlock]:
        """One search block per transformer block: qkv and proj (and fc1, fc2 with ``include_mlp``)."""
        out = []
        for i, b in enumerate(self.blocks):
            layers = (b.fc1, b.fc2, b.attn.qkv, b.attn.proj) if include_mlp else (b.attn.qkv, b.attn.proj)
            out.append(SearchBlock(f"blocks.{i}", layers, i))
        return out

    def end_layers(self) -> tuple[tuple[QConv2d], tuple[QLinear]]:
        return (self.patch_proj,), (self.head,)


@register_family(VisionTransformer, "VisionTransformer (ViT, DeiT)")
def build_vit(model: VisionTransformer, cfg: QuantConfig, model_name: str) -> QuantViT:
    return QuantViT(model, cfg, model_name)
