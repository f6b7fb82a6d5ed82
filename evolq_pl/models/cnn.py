"""CNNs (timm ``ResNet``: resnet18/50; timm ``EfficientNet`` in its MobileNetV2 form: mobilenetv2_100) with BatchNorm
folded and every convolution, activation and the classifier quantized.

The same recipe as the transformer families where it applies: per-output-channel weights (the configured bits,
observer and bias correction), uint8 per-tensor activations. Each conv is folded with its BN (evolq_pl.models.folding)
into a QConv2d; after the conv and its activation comes one activation quantizer, as a deployed conv+act kernel writes
it. A residual block quantizes both operands of its sum and, after the sum (and ResNet's ReLU), the sum again. Max
pooling and ReLU commute with a per-tensor grid, so nothing is quantized twice for them.

One search block per residual (ResNet) or (inverted) residual (MobileNetV2) block, holding every conv of it, the
shortcut's included: the CNN counterpart of Evol-Q's attention qkv/proj (evolq-reference §2.1). The stem, the
MobileNetV2 head conv and the classifier are quantized but not searched, as the ViT's patch embedding and head.
"""

from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from evolq_pl.models.base import QuantizedModel, SearchBlock
from evolq_pl.models.folding import fold_conv_bn
from evolq_pl.models.registry import register_family
from evolq_pl.models.vit import act_quantizer, qlinear
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear


def _plain(m: nn.Module | None) -> bool:
    """Absent, or a module that does nothing in eval mode for our purposes (timm puts Identity where unused)."""
    return m is None or isinstance(m, nn.Identity)


class QConvAct(nn.Module):
    """Folded conv (QConv2d), its activation (timm's module, or none) and the activation quantizer on the result."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None, cfg: QuantConfig) -> None:
        super().__init__()
        self.conv = QConv2d.from_float(fold_conv_bn(conv, bn), cfg.weight_type, cfg.weight_observer,
                                       cfg.bias_correction)
        self.act = act if act is not None else nn.Identity()
        self.q_out = act_quantizer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_out(self.act(self.conv(x)))


class QResidualBlock(nn.Module):
    """``body`` convs in sequence; with a skip, + the input (through the ``shortcut`` conv if any), then
    ``post_act`` and ``q_out``. Without a skip the body's last quantizer is the block's output."""

    def __init__(self, body: list[QConvAct], cfg: QuantConfig, skip: bool, shortcut: QConvAct | None = None,
                 post_act: nn.Module | None = None) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)
        self.skip = skip
        self.shortcut = shortcut
        self.post_act = post_act if post_act is not None else nn.Identity()
        self.q_out = act_quantizer(cfg) if skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for unit in self.body:
            h = unit(h)
        if not self.skip:
            return h
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return self.q_out(self.post_act(h + shortcut))

    def convs(self) -> tuple[QConv2d, ...]:
        """Every conv of the block in forward order, the shortcut's last."""
        units = [*self.body, *([self.shortcut] if self.shortcut is not None else [])]
        return tuple(u.conv for u in units)


class QuantCNN(QuantizedModel):
    """Input quantizer, stem, a flat list of residual blocks, an optional head conv, average pooling, classifier.

    ``forward_to(i)`` runs the stem and blocks ``0..i-1``; ``forward_from(i)`` the rest, so a candidate for block
    ``i`` reruns only its suffix.
    """

    def __init__(self, model_name: str, cfg: QuantConfig, stem: nn.Sequential, blocks: list[QResidualBlock],
                 neck: nn.Sequential, pool: SelectAdaptivePool2d, head: nn.Linear, pretrained_cfg: dict) -> None:
        super().__init__()
        self.model_name, self.qconfig = model_name, cfg
        quantize_input = True if cfg.quantize_input is None else cfg.quantize_input
        self.q_input = act_quantizer(cfg) if quantize_input else None
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.pool = pool  # timm's parameter-free global average pooling (with flatten)
        self.q_pool = act_quantizer(cfg)
        self.head = qlinear(head, cfg)
        self.q_logits = act_quantizer(cfg)
        self.pretrained_cfg = pretrained_cfg

    def head_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_pool(self.pool(self.neck(x)))
        return self.q_logits(self.head(x))

    def forward_to(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.q_input is not None:
            x = self.q_input(x)
        x = self.stem(x)
        for block in self.blocks[:index]:
            x = block(x)
        return x

    def forward_from(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        for block in self.blocks[index:]:
            x = block(x)
        return self.head_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, self.forward_to(0, x))

    def block_units(self, include_mlp: bool = False) -> list[SearchBlock]:
        """One search block per residual block, with all its convolutions (there is no MLP to add)."""
        if include_mlp:
            raise ValueError("search_mlp applies to transformer families: a CNN search block already holds every "
                             "convolution of its residual block; leave search_mlp false")
        return [SearchBlock(f"blocks.{i}", b.convs(), i) for i, b in enumerate(self.blocks)]

    def end_layers(self) -> tuple[tuple[QConv2d, ...], tuple[QConv2d | QLinear, ...]]:
        stem = tuple(m for m in self.stem.modules() if isinstance(m, QConv2d))
        return stem, (*(m for m in self.neck.modules() if isinstance(m, QConv2d)), self.head)


def _check_pool_and_head(pool: nn.Module, head: nn.Module, problems: list[str]) -> None:
    if not (isinstance(pool, SelectAdaptivePool2d) and pool.pool_type == "avg" and pool.flatten is not None
            and not isinstance(pool.flatten, nn.Identity)):
        problems.append("global average pooling (global_pool='avg')")
    if not isinstance(head, nn.Linear):
        problems.append("a Linear classifier (num_classes > 0)")


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats


# -- ResNet --------------------------------------------------------------------------------------------------------


def _check_resnet(model: ResNet) -> None:
    problems: list[str] = []
    if not isinstance(model.conv1, nn.Conv2d):
        problems.append("the plain 7x7 stem (stem_type='', not deep/tiered)")
    if not isinstance(model.maxpool, nn.MaxPool2d):
        problems.append("max-pool stem downsampling (no replace_stem_pool, no anti-aliasing)")
    _check_pool_and_head(model.global_pool, model.fc, problems)
    for block in model.modules():
        if isinstance(block, BasicBlock | Bottleneck):
            if not (_plain(block.se) and _plain(getattr(block, "aa", None))):
                problems.append("blocks without attention (SE/ECA) or anti-aliasing layers")
                break
            down = block.downsample
            if down is not None and not (isinstance(down, nn.Sequential) and len(down) == 2
                                         and isinstance(down[0], nn.Conv2d) and _is_bn(down[1])):
                problems.append("conv+BN shortcuts (not avg_down)")
                break
            norms = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])
            if not all(_is_bn(n) for n in norms):
                problems.append("BatchNorm2d after every conv")
                break
    if not all(isinstance(b, BasicBlock | Bottleneck) for layer in (model.layer1, model.layer2, model.layer3,
                                                                    model.layer4) for b in layer):
        problems.append("BasicBlock or Bottleneck blocks")
    if problems:
        raise ValueError("unsupported ResNet variant: the quantized ResNet needs " + "; ".join(dict.fromkeys(problems)))


def _resnet_block(block: BasicBlock | Bottleneck, cfg: QuantConfig) -> QResidualBlock:
    body = [QConvAct(block.conv1, block.bn1, block.act1, cfg)]
    if isinstance(block, Bottleneck):
        body += [QConvAct(block.conv2, block.bn2, block.act2, cfg), QConvAct(block.conv3, block.bn3, None, cfg)]
        post_act = block.act3
    else:
        body.append(QConvAct(block.conv2, block.bn2, None, cfg))
        post_act = block.act2
    down = block.downsample
    shortcut = QConvAct(down[0], down[1], None, cfg) if down is not None else None
    return QResidualBlock(body, cfg, skip=True, shortcut=shortcut, post_act=post_act)


@register_family(ResNet, "ResNet (resnet18, resnet50)")
def build_resnet(model: ResNet, cfg: QuantConfig, model_name: str) -> QuantCNN:
    _check_resnet(model)
    stem = nn.Sequential(QConvAct(model.conv1, model.bn1, model.act1, cfg), model.maxpool)
    blocks = [_resnet_block(b, cfg) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
              for b in layer]
    return QuantCNN(model_name, cfg, stem, blocks, nn.Sequential(), model.global_pool, model.fc,
                    dict(getattr(model, "pretrained_cfg", {}) or {}))


# -- MobileNetV2 (timm EfficientNet) -------------------------------------------------------------------------------


def _bn_act(bn: nn.Module) -> nn.Module | None:
    """The activation timm's BatchNormAct2d applies after its BN (None where it has none)."""
    act = getattr(bn, "act", None)
    return None if _plain(act) else act


def _check_efficientnet(model: EfficientNet) -> None:
    problems: list[str] = []
    if type(model.conv_stem) is not nn.Conv2d or type(model.conv_head) is not nn.Conv2d:
        problems.append("plain Conv2d stem and head convs (not tf_ 'same' padding, a head conv present)")
    for block in (b for stage in model.blocks for b in stage):
        if not isinstance(block, DepthwiseSeparableConv | InvertedResidual):
            problems.append("DepthwiseSeparableConv and InvertedResidual blocks (MobileNetV2's)")
            break
        if not (_plain(block.se) and _plain(block.aa) and getattr(block, "conv_s2d", None) is None):
            problems.append("blocks without squeeze-excitation, anti-aliasing or space-to-depth")
            break
        convs = [block.conv_dw, block.conv_pw] + ([block.conv_pwl] if isinstance(block, InvertedResidual) else [])
        if not all(type(c) is nn.Conv2d for c in convs):
            problems.append("plain Conv2d layers in every block (no CondConv, no 'same' padding)")
            break
    norms = [m for n, m in model.named_modules() if n.split(".")[-1].startswith("bn")]
    if not all(_is_bn(n) for n in norms):
        problems.append("BatchNorm2d after every conv")
    _check_pool_and_head(model.global_pool, model.classifier, problems)
    if problems:
        raise ValueError("unsupported EfficientNet variant: the quantized MobileNetV2 needs "
                         + "; ".join(dict.fromkeys(problems)))


def _mobilenet_block(block: DepthwiseSeparableConv | InvertedResidual, cfg: QuantConfig) -> QResidualBlock:
    if isinstance(block, InvertedResidual):
        body = [QConvAct(block.conv_pw, block.bn1, _bn_act(block.bn1), cfg),
                QConvAct(block.conv_dw, block.bn2, _bn_act(block.bn2), cfg),
                QConvAct(block.conv_pwl, block.bn3, _bn_act(block.bn3), cfg)]
    else:
        body = [QConvAct(block.conv_dw, block.bn1, _bn_act(block.bn1), cfg),
                QConvAct(block.conv_pw, block.bn2, _bn_act(block.bn2), cfg)]
    return QResidualBlock(body, cfg, skip=block.has_skip)


@register_family(EfficientNet, "EfficientNet (mobilenetv2_100 and other MobileNetV2 widths)")
def build_efficientnet(model: EfficientNet, cfg: QuantConfig, model_name: str) -> QuantCNN:
    _check_efficientnet(model)
    stem = nn.Sequential(QConvAct(model.conv_stem, model.bn1, _bn_act(model.bn1), cfg))
    blocks = [_mobilenet_block(b, cfg) for stage in model.blocks for b in stage]
    neck = nn.Sequential(QConvAct(model.conv_head, model.bn2, _bn_act(model.bn2), cfg))
    return QuantCNN(model_name, cfg, stem, blocks, neck, model.global_pool, model.classifier,
                    dict(getattr(model, "pretrained_cfg", {}) or {}))

