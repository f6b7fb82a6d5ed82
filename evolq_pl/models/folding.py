"""BatchNorm folding, the one place it is written: eval-mode BN is a per-channel affine map, merged into the
Conv/Linear next to it before quantizing, as the original does (``replace_batchnorm``), so the weights that get
quantized are the folded ones."""

from __future__ import annotations

import torch
from torch import nn


def bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = a·x + b per channel, in float64 so folding adds no visible rounding."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gain = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gain / torch.sqrt(var + bn.eps)
    return a, shift - mean * a


def as_params(weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """Folded float64 weight and bias as parameters in the dtype of the original weight ``like``."""
    return nn.Parameter(weight.to(like.dtype)), nn.Parameter(bias.to(like.dtype))


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Conv then BN -> one Conv2d with bias, same geometry: W' = a·W (per output channel), b' = b_bn (+ a·b_conv)."""
    a, b = bn_affine(bn)
    if conv.bias is not None:
        b = b + a * conv.bias.double()
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, True, conv.padding_mode, device="meta")
    out.weight, out.bias = as_params(conv.weight.double() * a[:, None, None, None], b, conv.weight)
    return out
