"""FakeQuantizer: the one module that quantizes a tensor, with its parameters as buffers."""

from __future__ import annotations

import torch
from torch import nn

from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.observers import build_observer


class FakeQuantizer(nn.Module):
    """Uniform fake quantizer with an observer; ``scale``/``zero_point`` live in the state_dict.

    ``dim`` is the channel dimension of the tensors it sees (None: per tensor) and ``channels`` its size. Runtime
    flags (set by :mod:`evolq_pl.quant.modes`): ``enabled`` fake-quantizes, ``observing``/``scoring`` feed the
    observer during calibration and pass the input through unchanged. ``reuse_input``: the model promises that
    every input is a temporary read by nobody else, so inference may quantize it in place (no new buffer).
    """

    def __init__(
        self,
        bit_type: BitType,
        observer: str = "minmax",
        channels: int | None = None,
        dim: int | None = None,
        reuse_input: bool = False,
    ) -> None:
        super().__init__()
        if (channels is None) != (dim is None):
            raise ValueError("give both channels and dim for a per-channel quantizer, or neither for per-tensor")
        self.bit_type = bit_type
        self.dim = dim
        self.reuse_input = reuse_input
        self.observer_name = observer
        self.observer = build_observer(observer, bit_type, dim)
        n = channels or 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.register_buffer("calibrated", torch.tensor(False))
        self.enabled = False
        self.observing = False
        self.scoring = False

    @property
    def granularity(self) -> str:
        return "tensor" if self.dim is None else f"channel(dim={self.dim})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or self.scoring:
            if self.observing:
                self.observer.observe(x)
            if self.scoring:
                self.observer.score(x)
            return x
        if self.enabled:
            if x.dtype in (torch.bfloat16, torch.float16) and F.inplace_ok(x):
                # the in-place path's first op upcasts on load (exactly): no float32 copy of a bf16 activation
                return F.fake_quantize(x, self.scale, self.zero_point, self.bit_type, self.dim)
            if self.reuse_input:
                return F.fake_quantize_(x.float(), self.scale, self.zero_point, self.bit_type, self.dim)
            return F.fake_quantize(x.float(), self.scale, self.zero_point, self.bit_type, self.dim)
        return x

    @torch.no_grad()
    def finalize(self) -> None:
        """Copy the observer's choice into the buffers; the observer's statistics are then dropped."""
        scale, zero_point = self.observer.qparams()
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated.fill_(True)
        self.observer.reset()

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Calibrate on one tensor at once (weights: the data never changes)."""
        self.observer.reset()
        self.observer.observe(x)
        if self.observer.scored:
            self.observer.score(x)
        self.finalize()

    def extra_repr(self) -> str:
        return f"{self.bit_type.name}, observer={self.observer_name}, granularity={self.granularity}"


class Log2Quantizer(nn.Module):
    """Log2 grid for values in [0, 1] (softmax outputs): x̂ = 2^-round(-log2 x); needs no calibration."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bit_type = BitType(bits, False)
        self.register_buffer("calibrated", torch.tensor(True))
        self.enabled = False
        self.observing = False
        self.scoring = False
        self.observer_name = "none"
        self.granularity = "tensor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and not (self.observing or self.scoring):
            y = F.log2_quantize(x.float(), self.bit_type.bits)
            return F.straight_through(y, x.float()) if F.needs_grad(x) else y
        return x

    def finalize(self) -> None:
        """Nothing to fit."""

    def extra_repr(self) -> str:
        return f"log2 {self.bit_type.name}"
