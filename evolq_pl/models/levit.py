"""LeViT (timm ``Levit`` / ``LevitDistilled``) with quantizers at the reference's tensor map (§1.9).

timm is not forked. Every BatchNorm is first folded into the Conv/Linear next to it, as the original does before it
quantizes (``replace_batchnorm``), so weights are quantized after folding; the folded layers become QConv2d/QLinear.
The attention forwards are re-owned here because the quantizers sit between timm's operations; the attention
biases stay timm's parameters but are gathered on every forward, not read from timm's per-device cache.

Quirk 18 of the reference: the original leaves the input image, the post-Hardswish input of the Attention ``proj``
and every MLP ``fc2`` output unquantized. By default they are quantized here; ``QuantConfig(faithful=True)``
leaves them unquantized as the original does.
"""

from __future__ import annotations

import torch
from timm.models.levit import (
    Attention,
    AttentionDownsample,
    ConvNorm,
    Levit,
    LevitBlock,
    LevitDistilled,
    LevitDownsample,
    LevitMlp,
    LinearNorm,
    NormLinear,
    Stem8,
    Stem16,
)
from torch import nn

from evolq_pl.models.base import QuantizedModel, SearchBlock
from evolq_pl.models.folding import as_params, bn_affine, fold_conv_bn
from evolq_pl.models.registry import register_family
from evolq_pl.models.vit import act_quantizer, ptf_quantizer, qlinear
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear, QSoftmax
from evolq_pl.quant.quantizer import FakeQuantizer

# -- BatchNorm folding ---------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_linear_norm(layer: LinearNorm) -> nn.Linear:
    """Linear then BN -> one Linear: W' = a·W (per output row), b' = b_bn (+ a·b_lin)."""
    lin, (a, b) = layer.linear, bn_affine(layer.bn)
    if lin.bias is not None:
        b = b + a * lin.bias.double()
    out = nn.Linear(lin.in_features, lin.out_features, device="meta")
    out.weight, out.bias = as_params(lin.weight.double() * a[:, None], b, lin.weight)
    return out


@torch.no_grad()
def fold_conv_norm(layer: ConvNorm) -> nn.Conv2d:
    """Conv then BN -> one Conv2d with bias, same geometry."""
    return fold_conv_bn(layer.linear, layer.bn)


@torch.no_grad()
def fold_norm_linear(layer: NormLinear) -> nn.Linear:
    """BN then Linear (the classifier heads) -> one Linear: W' = W·diag(a), b' = W·b_bn + b_lin."""
    lin, (a, b) = layer.linear, bn_affine(layer.bn)
    w = lin.weight.double()
    bias = w @ b + (lin.bias.double() if lin.bias is not None else 0.0)
    out = nn.Linear(lin.in_features, lin.out_features, device="meta")
    out.weight, out.bias = as_params(w * a[None, :], bias, lin.weight)
    return out


def _qlinear(layer: LinearNorm | NormLinear, cfg: QuantConfig) -> QLinear:
    folded = fold_norm_linear(layer) if isinstance(layer, NormLinear) else fold_linear_norm(layer)
    return qlinear(folded, cfg)


def _maybe(cfg: QuantConfig) -> FakeQuantizer | None:
    """A quantizer the original forgot (quirk 18): present by default, absent with ``faithful``."""
    return None if cfg.faithful else act_quantizer(cfg)


def _q(quantizer: FakeQuantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


# -- quantized parts -----------------------------------------------------------------------------------------------


class QStem(nn.Module):
    """Stride-16 (or 8) conv stem: each folded conv and each activation is followed by a channel-wise PTF (dim 1)."""

    def __init__(self, stem: nn.Sequential, cfg: QuantConfig) -> None:
        super().__init__()
        self.order: list[str] = []
        channels = 0
        for name, m in stem.named_children():
            if isinstance(m, ConvNorm):
                channels = m.linear.out_channels
                layer: nn.Module = QConv2d.from_float(fold_conv_norm(m), cfg.weight_type, cfg.weight_observer,
                                                      cfg.bias_correction)
            else:
                layer = m
            self.add_module(name, layer)
            self.add_module(f"q_{name}", ptf_quantizer(cfg, channels, dim=1))
            self.order.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, f"q_{name}")(getattr(self, name)(x))
        return x


class _QAttentionCore(nn.Module):
    """What Attention and AttentionDownsample share: quantized q/k/v, scores, biased scores, softmax, attn·v, proj."""

    def _init_core(self, attn: Attention | AttentionDownsample, cfg: QuantConfig, quantize_act: bool) -> None:
        self.num_heads, self.key_dim, self.val_dim = attn.num_heads, attn.key_dim, attn.val_dim
        self.val_attn_dim, self.scale = attn.val_attn_dim, attn.scale
        self.attention_biases = attn.attention_biases  # shared with timm
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs.clone(), persistent=False)
        self.q_q, self.q_k, self.q_v = act_quantizer(cfg), act_quantizer(cfg), act_quantizer(cfg)
        self.q_scores = act_quantizer(cfg)
        self.q_biased = act_quantizer(cfg)
        self.softmax = QSoftmax(cfg.softmax, cfg.softmax_bits, cfg.act_observer)
        self.q_attn_v = act_quantizer(cfg)
        self.act = attn.proj.act
        self.q_act = act_quantizer(cfg) if quantize_act else _maybe(cfg)
        self.proj = _qlinear(attn.proj.ln, cfg)
        self.q_proj = act_quantizer(cfg)

    def attention_bias(self) -> torch.Tensor:
        """[heads, N_q, N_k], gathered now: follows the parameter's device, dtype and any later write."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B,H,Nq,d], k [B,H,Nk,d], v [B,H,Nk,dv] -> projected output [B,Nq,C]."""
        q, k, v = self.q_q(q), self.q_k(k), self.q_v(v)
        scores = self.q_scores(q @ k.transpose(-2, -1))  # quantized before the scale, as the reference
        scores = self.q_biased(scores * self.scale + self.attention_bias())
        attn = self.softmax(scores, self.q_biased)
        x = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.val_attn_dim)
        x = _q(self.q_act, self.act(self.q_attn_v(x)))
        return self.q_proj(self.proj(x))


class QLevitAttention(_QAttentionCore):
    """LeViT self-attention; the post-Hardswish proj input is unquantized with ``faithful`` (quirk 18)."""

    def __init__(self, attn: Attention, cfg: QuantConfig) -> None:
        super().__init__()
        self._init_core(attn, cfg, quantize_act=False)
        self.qkv = _qlinear(attn.qkv, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], 3)
        return self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


class QLevitAttentionDownsample(_QAttentionCore):
    """Subsampling attention (not residual): keys/values from all tokens, queries from every stride-th token."""

    def __init__(self, attn: AttentionDownsample, cfg: QuantConfig) -> None:
        super().__init__()
        self._init_core(attn, cfg, quantize_act=True)  # the reference quantizes the proj input here
        self.kv = _qlinear(attn.kv, cfg)
        self.down = attn.q.down  # parameter-free token subsampling (timm's)
        self.query = _qlinear(attn.q.ln, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], 3)
        q = self.query(self.down(x)).view(b, -1, self.num_heads, self.key_dim)
        return self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


class QLevitMlp(nn.Module):
    """fc1 -> A -> Hardswish -> A -> fc2 (-> A, absent with ``faithful``: quirk 18)."""

    def __init__(self, mlp: LevitMlp, cfg: QuantConfig) -> None:
        super().__init__()
        self.fc1 = _qlinear(mlp.ln1, cfg)
        self.q_fc1 = act_quantizer(cfg)
        self.act = mlp.act
        self.q_act = act_quantizer(cfg)
        self.fc2 = _qlinear(mlp.ln2, cfg)
        self.q_fc2 = _maybe(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_act(self.act(self.q_fc1(self.fc1(x))))
        return _q(self.q_fc2, self.fc2(x))


class QLevitBlock(nn.Module):
    """Residual attention then residual MLP, each sum PTF-quantized; one search block starts here."""

    def __init__(self, block: LevitBlock, cfg: QuantConfig) -> None:
        super().__init__()
        dim = block.mlp.ln2.linear.out_features
        self.attn = QLevitAttention(block.attn, cfg)
        self.q_res1 = ptf_quantizer(cfg, dim)
        self.mlp = QLevitMlp(block.mlp, cfg)
        self.q_out = ptf_quantizer(cfg, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_res1(x + self.attn(x))
        return self.q_out(x + self.mlp(x))

    def attention_layers(self) -> tuple[QLinear, ...]:
        return self.attn.qkv, self.attn.proj


class QLevitDownsample(nn.Module):
    """Subsampling attention then a residual MLP (PTF sum); one search block starts here."""

    def __init__(self, down: LevitDownsample, cfg: QuantConfig) -> None:
        super().__init__()
        dim = down.mlp.ln2.linear.out_features
        self.attn_downsample = QLevitAttentionDownsample(down.attn_downsample, cfg)
        self.mlp = QLevitMlp(down.mlp, cfg)
        self.q_out = ptf_quantizer(cfg, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return self.q_out(x + self.mlp(x))

    def attention_layers(self) -> tuple[QLinear, ...]:
        a = self.attn_downsample
        return a.kv, a.query, a.proj


class QLevitStage(nn.Module):
    def __init__(self, stage: nn.Module, cfg: QuantConfig) -> None:
        super().__init__()
        self.downsample = QLevitDownsample(stage.downsample, cfg) if isinstance(stage.downsample,
                                                                               LevitDownsample) else None
        self.blocks = nn.ModuleList(QLevitBlock(b, cfg) for b in stage.blocks)


class QuantLevit(QuantizedModel):
    """Fully quantized LeViT: stem, every attention/MLP unit, pooling, both heads and the averaged logits.

    The units (each stage's downsample, then its blocks) run as one flat list; unit ``i`` starts with search
    block ``i``'s attention, so the MLPs between two attentions belong to the suffix of the earlier one.
    """

    def __init__(self, model: Levit, cfg: QuantConfig, model_name: str) -> None:
        super().__init__()
        self._check_supported(model)
        self.model_name, self.qconfig = model_name, cfg
        quantize_input = cfg.quantize_input
        if quantize_input is None:
            quantize_input = not cfg.faithful  # quirk 18: the original's input quantizer is commented out
        self.q_input = act_quantizer(cfg) if quantize_input else None
        self.stem = QStem(model.stem, cfg)
        self.q_embed = act_quantizer(cfg)
        self.stages = nn.ModuleList(QLevitStage(s, cfg) for s in model.stages)
        self.q_post = act_quantizer(cfg)
        self.q_mean = act_quantizer(cfg)
        distilled = isinstance(model, LevitDistilled)
        self.head = _qlinear(model.head, cfg)
        self.q_head = act_quantizer(cfg) if distilled else None
        self.head_dist = _qlinear(model.head_dist, cfg) if distilled else None
        self.q_head_dist = act_quantizer(cfg) if distilled else None
        self.q_logits = act_quantizer(cfg)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        side = [r * model.stem.stride for r in model.stages[0].blocks[0].attn.resolution]  # tokens x stem stride
        self.input_size = (model.stem.conv1.linear.in_channels, *side)

    @staticmethod
    def _check_supported(model: Levit) -> None:
        problems = []
        if model.use_conv:
            problems.append("the Linear layout (levit_*, not levit_conv_*)")
        if model.global_pool != "avg":
            problems.append("average pooling")
        if not isinstance(model.head, NormLinear) or not isinstance(getattr(model, "head_dist", model.head),
                                                                    NormLinear):
            problems.append("a classifier head (num_classes > 0)")
        if not isinstance(model.stem, Stem16 | Stem8):
            problems.append("timm's conv stem")
        for stage in model.stages:
            if not (isinstance(stage.downsample, LevitDownsample | nn.Identity)
                    and all(isinstance(b, LevitBlock) for b in stage.blocks)):
                problems.append("plain LevitBlocks and LevitDownsamples")
                break
        if problems:
            raise ValueError("unsupported Levit variant: the quantized LeViT needs " + "; ".join(problems))

    @property
    def units(self) -> list[QLevitBlock | QLevitDownsample]:
        """Each unit starts with one attention, in forward order."""
        out: list[QLevitBlock | QLevitDownsample] = []
        for stage in self.stages:
            if stage.downsample is not None:
                out.append(stage.downsample)
            out.extend(stage.blocks)
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> quantized tokens [B, N, C] entering the first attention."""
        x = self.q_embed(self.stem(_q(self.q_input, x)))
        return x.flatten(2).transpose(1, 2)

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_mean(self.q_post(x).mean(dim=1))
        logits = self.head(x)
        if self.head_dist is not None:  # eval output of the distilled model: the mean of both heads
            logits = (self.q_head(logits) + self.q_head_dist(self.head_dist(x))) / 2
        return self.q_logits(logits)

    def forward_to(self, index: int, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for unit in self.units[:index]:
            x = unit(x)
        return x

    def forward_from(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        for unit in self.units[index:]:
            x = unit(x)
        return self.head_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, self.embed(x))

    def block_units(self, include_mlp: bool = False) -> list[SearchBlock]:
        """Every Attention (qkv, proj) and AttentionDownsample (kv, q, proj) in forward order; with
        ``include_mlp`` also the MLP after it (fc1, fc2 first, so proj stays last and picks ε)."""
        names = {id(m): n for n, m in self.named_modules()}
        out = []
        for i, unit in enumerate(self.units):
            layers = unit.attention_layers()
            if include_mlp:
                layers = (unit.mlp.fc1, unit.mlp.fc2, *layers)
            out.append(SearchBlock(names[id(unit)], layers, i))
        return out

    def end_layers(self) -> tuple[tuple[QConv2d, ...], tuple[QLinear, ...]]:
        stem = tuple(m for m in self.stem.children() if isinstance(m, QConv2d))
        return stem, (self.head,) if self.head_dist is None else (self.head, self.head_dist)


@register_family(Levit, "Levit (LeViT-128S/128/192/256/384)")
def build_levit(model: Levit, cfg: QuantConfig, model_name: str) -> QuantLevit:
    return QuantLevit(model, cfg, model_name)
