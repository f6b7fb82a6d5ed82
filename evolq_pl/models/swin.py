"""Swin Transformer (timm ``SwinTransformer``) with quantizers on the ViT recipe's tensor map (§1.8), windowed.

timm is not forked: its Linear/Conv/LayerNorm parameters and relative position bias tables are shared with the
quantized layers; the block, window attention and patch merging forwards are re-owned here because timm's fused
attention hides the softmax. Every LayerNorm runs in integer mode on a PTF-quantized residual stream (the patch
embedding's LN output is quantized per tensor: it is normalized, so its channels share one range), scores are
quantized after the scale and again after the relative position bias, and the shifted windows' mask (0 or -100) is
added after that quantizer: it is a constant the softmax turns into exact zeros, and quantizing it with the scores
would stretch their range a hundredfold.

Quirk 20 of the reference: the original's Swin is FQ-ViT's and never applies bias correction. The configured
``bias_correction`` applies here too; ``QuantConfig(faithful=True)`` leaves it off, as the original.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as TF
from timm.layers import Mlp
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import nn

from evolq_pl.models.base import QuantizedModel, SearchBlock
from evolq_pl.models.registry import register_family
from evolq_pl.models.vit import act_quantizer, add_mlp_half, ptf_quantizer, qlinear
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QIntLayerNorm, QLinear, QSoftmax
from evolq_pl.quant.quantizer import FakeQuantizer


class QWindowAttention(nn.Module):
    """Multi-head self-attention inside each window: quantized qkv, scores, biased scores, softmax, attn·v, proj."""

    def __init__(self, attn: WindowAttention, mask: torch.Tensor | None, cfg: QuantConfig) -> None:
        super().__init__()
        self.num_heads, self.scale, self.window_area = attn.num_heads, attn.scale, attn.window_area
        self.qkv = qlinear(attn.qkv, cfg)
        self.proj = qlinear(attn.proj, cfg)
        self.relative_position_bias_table = attn.relative_position_bias_table  # shared with timm
        self.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)
        self.register_buffer("mask", None if mask is None else mask.clone(), persistent=False)
        self.q_qkv = act_quantizer(cfg, reuse_input=True)
        self.q_scores = act_quantizer(cfg, reuse_input=True)
        self.q_biased = act_quantizer(cfg, reuse_input=True)
        self.softmax = QSoftmax(cfg.softmax, cfg.softmax_bits, cfg.act_observer)
        self.q_attn_v = act_quantizer(cfg, reuse_input=True)
        self.q_proj = act_quantizer(cfg, reuse_input=True)

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N], gathered now: follows the shared table's device, dtype and any later write."""
        n = self.window_area
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows [B·nW, N, C] -> [B·nW, N, C]."""
        b, n, _ = x.shape
        q, k, v = self.q_qkv(self.qkv(x)).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = self.q_scores((q @ k.transpose(-2, -1)).mul_(self.scale))
        scores = self.q_biased(scores + self.position_bias())
        if self.mask is not None:
            windows = self.mask.shape[0]
            scores = (scores.view(-1, windows, self.num_heads, n, n) + self.mask[None, :, None]).view(b, -1, n, n)
        attn = self.softmax(scores, self.q_biased)
        x = self.q_attn_v((attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1))
        return self.q_proj(self.proj(x))


class QSwinBlock(nn.Module):
    """(Shifted-)window attention then MLP, each residual sum PTF-quantized; one search block per Swin block."""

    def __init__(self, block: SwinTransformerBlock, cfg: QuantConfig) -> None:
        super().__init__()
        dim = block.dim
        self.window_size, self.shift_size = block.window_size, block.shift_size
        self.input_resolution = tuple(block.input_resolution)  # (H, W) the mask was built for
        self.norm1 = QIntLayerNorm.from_float(block.norm1, cfg.int_norm)
        self.q_ln1 = act_quantizer(cfg, reuse_input=True)
        self.attn = QWindowAttention(block.attn, block.attn_mask, cfg)
        self.q_res1 = ptf_quantizer(cfg, dim, reuse_input=True)
        add_mlp_half(self, block, cfg, dim)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over (shifted) windows of [B, H, W, C], as timm: cyclic shift, zero pad, partition, back."""
        _, h, w, c = x.shape
        (wh, ww), shift = self.window_size, self.shift_size
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = TF.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        hp, wp = x.shape[1:3]
        windows = self.attn(window_partition(x, self.window_size).view(-1, wh * ww, c))
        x = window_reverse(windows.view(-1, wh, ww, c), self.window_size, hp, wp)[:, :h, :w]
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor, in_q: FakeQuantizer) -> torch.Tensor:
        h = self.q_ln1(self.norm1(x, in_q, self.q_ln1))
        x = self.q_res1(x + self._windowed(h))
        h = self.q_ln2(self.norm2(x, self.q_res1, self.q_ln2))
        h = self.q_fc1(self.act(self.fc1(h)))
        h = self.q_fc2(self.fc2(self.mlp_norm(h)))
        return self.q_out(x + h)


class _TiledScale:
    """The PTF grid of a C-channel tensor seen by the 4C channels that patch merging concatenates (2x2 neighbours
    side by side), so the merge's integer LayerNorm reads the previous block's grid without a second quantizer."""

    def __init__(self, quantizer: FakeQuantizer, times: int) -> None:
        self.quantizer, self.times = quantizer, times

    @property
    def scale(self) -> torch.Tensor:
        return self.quantizer.scale.repeat(self.times)


class QPatchMerging(nn.Module):
    """2x2 neighbour concat -> integer LN -> A -> reduction Linear -> PTF (the next stage's residual stream)."""

    def __init__(self, merge: PatchMerging, input_resolution: tuple[int, int], cfg: QuantConfig) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.norm = QIntLayerNorm.from_float(merge.norm, cfg.int_norm)
        self.q_norm = act_quantizer(cfg, reuse_input=True)
        self.reduction = qlinear(merge.reduction, cfg)
        self.q_out = ptf_quantizer(cfg, merge.out_dim, reuse_input=True)

    def forward(self, x: torch.Tensor, in_q: FakeQuantizer) -> torch.Tensor:
        b, h, w, c = x.shape
        x = TF.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1:3]
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.q_norm(self.norm(x, _TiledScale(in_q, 4), self.q_norm))
        return self.q_out(self.reduction(x))


class QSwinStage(nn.Module):
    def __init__(self, stage: nn.Module, cfg: QuantConfig) -> None:
        super().__init__()
        merges = isinstance(stage.downsample, PatchMerging)
        self.downsample = QPatchMerging(stage.downsample, stage.input_resolution, cfg) if merges else None
        self.blocks = nn.ModuleList(QSwinBlock(b, cfg) for b in stage.blocks)


class QuantSwin(QuantizedModel):
    """Fully quantized SwinTransformer: patch embedding, every block and patch merging, final norm, pooling, head.

    The blocks of all stages run as one flat list; a stage's patch merging belongs to the prefix of its first block.
    """

    def __init__(self, model: SwinTransformer, cfg: QuantConfig, model_name: str) -> None:
        super().__init__()
        self._check_supported(model)
        self.model_name, self.qconfig = model_name, cfg
        self.input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)  # the masks' resolution
        if cfg.faithful:
            cfg = replace(cfg, bias_correction=False)  # quirk 20
        quantize_input = True if cfg.quantize_input is None else cfg.quantize_input  # as DeiT and LeViT
        self.q_input = act_quantizer(cfg) if quantize_input else None
        self.patch_proj = QConv2d.from_float(model.patch_embed.proj, cfg.weight_type, cfg.weight_observer,
                                             cfg.bias_correction)
        self.q_patch = ptf_quantizer(cfg, model.patch_embed.proj.out_channels, reuse_input=True)
        self.patch_norm = QIntLayerNorm.from_float(model.patch_embed.norm, cfg.int_norm)
        self.q_embed = act_quantizer(cfg, reuse_input=True)
        self.stages = nn.ModuleList(QSwinStage(s, cfg) for s in model.layers)
        self.norm = QIntLayerNorm.from_float(model.norm, cfg.int_norm)
        self.q_norm = act_quantizer(cfg, reuse_input=True)
        self.q_pool = act_quantizer(cfg, reuse_input=True)
        self.head = qlinear(model.head.fc, cfg)
        self.q_logits = act_quantizer(cfg, reuse_input=True)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        # block index -> (stage, index in stage), and the quantizer whose grid each block's input is on
        self._where = [(s, j) for s, stage in enumerate(self.stages) for j in range(len(stage.blocks))]

    @staticmethod
    def _check_supported(model: SwinTransformer) -> None:
        problems = []
        if model.dynamic_img_size:
            problems.append("a fixed image size (strict_img_size=True; masks built once)")
        if not isinstance(model.patch_embed.norm, nn.LayerNorm) or not isinstance(model.norm, nn.LayerNorm):
            problems.append("LayerNorm after the patch embedding and at the end (patch_norm, norm_layer=LayerNorm)")
        if model.global_pool != "avg" or not isinstance(model.head.fc, nn.Linear):
            problems.append("average pooling and a Linear classifier (global_pool='avg', num_classes > 0)")
        for stage in model.layers:
            if not isinstance(stage.downsample, PatchMerging | nn.Identity):
                problems.append("timm's PatchMerging between stages")
            for block in stage.blocks:
                if not (isinstance(block, SwinTransformerBlock) and isinstance(block.mlp, Mlp)
                        and isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
                    problems.append("plain SwinTransformerBlocks with LayerNorms and an Mlp")
                elif block.dynamic_mask:
                    problems.append("a fixed image size (strict_img_size=True; masks built once)")
        if problems:
            raise ValueError("unsupported SwinTransformer variant: the quantized Swin needs "
                             + "; ".join(dict.fromkeys(problems)))

    @property
    def blocks(self) -> list[QSwinBlock]:
        """Every Swin block in forward order (one search block each)."""
        return [self.stages[s].blocks[j] for s, j in self._where]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> quantized tokens [B, H, W, C] entering block 0."""
        if self.q_input is not None:
            x = self.q_input(x)
        x = self.q_patch(self.patch_proj(x).permute(0, 2, 3, 1))
        return self.q_embed(self.patch_norm(x, self.q_patch, self.q_embed))

    def _run(self, start: int, stop: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks ``start`` to ``stop - 1``, with the patch merging before each stage's first block; ``x`` is the
        input of block ``start`` (past its merging)."""
        for i in range(start, stop):
            s, j = self._where[i]
            stage = self.stages[s]
            if j == 0 and stage.downsample is not None and i > start:
                x = stage.downsample(x, self._in_quantizer(i, merged=False))
            x = stage.blocks[j](x, self._in_quantizer(i))
        return x

    def _in_quantizer(self, index: int, merged: bool = True) -> FakeQuantizer:
        """The quantizer whose grid block ``index``'s input lies on (its merging's input with ``merged=False``)."""
        s, j = self._where[index]
        if merged and j == 0 and self.stages[s].downsample is not None:
            return self.stages[s].downsample.q_out
        return self.q_embed if index == 0 else self.blocks[index - 1].q_out

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_norm(self.norm(x, self.blocks[-1].q_out, self.q_norm))
        return self.q_logits(self.head(self.q_pool(x.mean(dim=(1, 2)))))

    def forward_to(self, index: int, x: torch.Tensor) -> torch.Tensor:
        x = self._run(0, index, self.embed(x))
        if index < len(self._where):
            s, j = self._where[index]
            if j == 0 and self.stages[s].downsample is not None:
                x = self.stages[s].downsample(x, self._in_quantizer(index, merged=False))
        return x

    def forward_from(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self._run(index, len(self._where), hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, self.forward_to(0, x))

    def block_units(self, include_mlp: bool = False) -> list[SearchBlock]:
        """One search block per Swin block: qkv and proj (and fc1, fc2 first with ``include_mlp``, so proj stays
        last and picks ε), in forward order."""
        out = []
        for (s, j), b in zip(self._where, self.blocks, strict=True):
            layers = (b.fc1, b.fc2, b.attn.qkv, b.attn.proj) if include_mlp else (b.attn.qkv, b.attn.proj)
            out.append(SearchBlock(f"stages.{s}.blocks.{j}", layers, len(out)))
        return out

    def end_layers(self) -> tuple[tuple[QConv2d], tuple[QLinear]]:
        return (self.patch_proj,), (self.head,)


@register_family(SwinTransformer, "SwinTransformer (Swin-T/S/B)")
def build_swin(model: SwinTransformer, cfg: QuantConfig, model_name: str) -> QuantSwin:
    return QuantSwin(model, cfg, model_name)
