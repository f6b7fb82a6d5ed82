"""The search's only way into a model: one flat vector of a block's per-channel weight scales."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class _Quantizer(Protocol):
    scale: torch.Tensor


class _ScaledLayer(Protocol):
    weight_quantizer: _Quantizer


class ScaleVector:
    """Reads and writes the concatenated scales of some layers (zero points stay fixed, as the reference)."""

    def __init__(self, layers: Sequence[_ScaledLayer]) -> None:
        if not layers:
            raise ValueError("a search block needs at least one quantized layer")
        self.layers = tuple(layers)
        self.sizes = [layer.weight_quantizer.scale.numel() for layer in self.layers]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def get(self) -> torch.Tensor:
        """A detached float32 copy of the current scales, flattened in layer order."""
        return torch.cat([layer.weight_quantizer.scale.detach().reshape(-1).float() for layer in self.layers])

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        """Write ``vector`` back in place (in place bumps the version counters that invalidate weight caches)."""
        if vector.numel() != self.numel:
            raise ValueError(f"scale vector has {vector.numel()} values, the block needs {self.numel}")
        for layer, chunk in zip(self.layers, torch.split(vector.reshape(-1), self.sizes), strict=True):
            scale = layer.weight_quantizer.scale
            scale.copy_(chunk.reshape(scale.shape).to(scale.device, scale.dtype))
