"""Observers: collect statistics during calibration, then choose (scale, zero_point) (evolq-reference §1.4).

Contract: ``observe(x)`` updates running statistics; ``score(x)`` accumulates the candidate errors that OMSE and
PTF minimise (the reference scores only the last calibration batch; calling ``score`` on every batch fits all of
them); ``qparams()`` returns the chosen parameters. ``dim`` is the channel dimension, or None for per-tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from evolq_pl.quant import formulas
from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType


class Observer(nn.Module):
    """Running min/max; subclasses change how the range turns into (scale, zero_point)."""

    scored = False  # True where qparams() needs score() calls (OMSE, PTF)

    def __init__(self, bit_type: BitType, dim: int | None = None) -> None:
        super().__init__()
        self.bit_type = bit_type
        self.dim = dim
        self.register_buffer("min_val", None)
        self.register_buffer("max_val", None)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.channel_minmax(x.detach().float(), self.dim)

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def score(self, x: torch.Tensor) -> None:
        """Only OMSE and PTF use the data beyond its range."""

    def _require_stats(self) -> None:
        if self.min_val is None:
            raise RuntimeError("observer saw no data: run calibration on at least one batch before quantizing")

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_stats()
        return F.qparams_from_minmax(self.min_val, self.max_val, self.bit_type)

    def reset(self) -> None:
        self.min_val = self.max_val = None


class MinMaxObserver(Observer):
    """Running min/max over every calibration batch."""


class EMAObserver(Observer):
    """Exponential moving average (σ = 0.01) of per-batch min/max."""

    momentum = 0.01

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.momentum * (lo - self.min_val)
            self.max_val = self.max_val + self.momentum * (hi - self.max_val)


class PercentileObserver(EMAObserver):
    """Per-batch 0.99999/0.00001 quantiles of the flattened tensor, then EMA; per tensor only (as the reference)."""

    upper, lower = 0.99999, 0.00001

    def __init__(self, bit_type: BitType, dim: int | None = None) -> None:
        if dim is not None:
            raise ValueError("the percentile observer is per-tensor only: use granularity 'tensor' or another observer")
        super().__init__(bit_type, dim)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.detach().float().flatten()
        if flat.numel() > 16_000_000:  # torch.quantile's input limit
            flat = flat[torch.linspace(0, flat.numel() - 1, 16_000_000, device=flat.device).long()]
        q = torch.quantile(flat, torch.tensor([self.lower, self.upper], device=flat.device))
        return q[0:1], q[1:2]


class OMSEObserver(Observer):
    """Shrinks [min, max] by 1 - 0.01·i (i < 90) and keeps the ratio with the lowest MSE.

    One ratio per tensor even when per-channel, and the asymmetric formula even for signed types (quirk 14).
    """

    scored = True
    steps = 90

    def __init__(self, bit_type: BitType, dim: int | None = None) -> None:
        super().__init__(bit_type, dim)
        self.register_buffer("errors", None)
        self._ratios = F.omse_candidates(self.steps)

    def _candidate(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._ratios[i]
        return F.qparams_from_minmax(self.min_val * r, self.max_val * r, self.bit_type, symmetric=False)

    def score(self, x: torch.Tensor) -> None:
        self._require_stats()
        x = x.detach().float()
        errs = torch.stack([F.quant_mse(x, *self._candidate(i), self.bit_type, self.dim) for i in range(self.steps)])
        self.errors = errs if self.errors is None else self.errors + errs

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_stats()
        if self.errors is None:
            raise RuntimeError("OMSE observer was never scored: calibration must mark its last batch")
        return self._candidate(int(torch.argmin(self.errors)))

    def reset(self) -> None:
        super().reset()
        self.errors = None


class PTFObserver(Observer):
    """Power-of-two factor: one zero point for all channels, per-channel scale (s8/8)·2^α_c, α_c ∈ {0..3}."""

    scored = True

    def __init__(self, bit_type: BitType, dim: int | None = -1) -> None:
        if dim is None:
            raise ValueError("the ptf observer is per-channel: give it the channel dimension")
        super().__init__(bit_type, dim)
        self.register_buffer("errors", None)

    def _shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F.ptf_candidates(self.min_val.min(), self.max_val.max(), self.bit_type)

    def score(self, x: torch.Tensor) -> None:
        self._require_stats()
        base, zp = self._shared()
        errs = F.ptf_channel_errors(x.float(), base, zp, self.bit_type, self.dim)
        self.errors = errs if self.errors is None else self.errors + errs

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_stats()
        if self.errors is None:
            raise RuntimeError("PTF observer was never scored: calibration must mark its last batch")
        base, zp = self._shared()
        alpha = torch.argmin(self.errors, dim=0)  # first minimum: the smallest α wins ties, as the reference
        scale = formulas.ptf_scale(base, alpha.float())
        return scale, zp.expand_as(scale).clone()

    def reset(self) -> None:
        super().reset()
        self.errors = None


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "omse": OMSEObserver,
    "ptf": PTFObserver,
}


def build_observer(name: str, bit_type: BitType, dim: int | None) -> Observer:
    """Observer by name; unknown names fail with the list of valid ones."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}: choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bit_type, dim)
