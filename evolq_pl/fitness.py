"""Fitness functions for the Evol-Q search: (student_logits, teacher_logits) -> scalar, lower is better.

All losses are computed in float32 whatever the input dtype, so a bf16/fp16 forward pass still ranks
candidates with full-precision arithmetic (the search compares losses that differ in the 4th-5th digit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

FitnessFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _prepare(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and return float32 copies on the student's device (the teacher cache may live on CPU)."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"fitness expects two [batch, classes] logit tensors of the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}; pass logits, not features or labels"
        )
    return student.float(), teacher.to(device=student.device, dtype=torch.float32)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use e.g. 3.0 (the reference default)")


def infonce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """MoCo-v3 one-direction InfoNCE between L2-normalised logits, times 2T (the reference's `contrastive`).

    The positive of image i is the teacher's logits for the same image; the other images of the batch are
    the negatives.
    """
    _check_temperature(temperature)
    s, t = _prepare(student, teacher)
    q = F.normalize(s, dim=1)
    k = F.normalize(t, dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 2.0 * temperature * F.cross_entropy(logits, labels)


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all logits (the reference's `--loss mse`, which crashes there)."""
    s, t = _prepare(student, teacher)
    return F.mse_loss(s, t)


def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher_softmax || student_softmax), batch mean (`--loss kl`, which crashes in the reference)."""
    s, t = _prepare(student, teacher)
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)


def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - cos(student_i, teacher_i) (the reference's `--loss cosine`, which crashes there)."""
    s, t = _prepare(student, teacher)
    return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


FITNESSES: dict[str, Callable[..., torch.Tensor]] = {
    "infonce": infonce,
    "mse": mse,
    "kl": kl,
    "cosine": cosine,
}


def get_fitness(name: str, temperature: float = 3.0) -> FitnessFn:
    """Return the named fitness as a two-argument callable; `temperature` only affects `infonce`.

    The temperature is validated for every name so that a bad config fails the same way whatever loss it
    picks.
    """
    _check_temperature(temperature)
    if name not in FITNESSES:
        raise ValueError(f"unknown fitness {name!r}; choose one of {', '.join(sorted(FITNESSES))}")
    if name == "infonce":
        return functools.partial(infonce, temperature=temperature)
    return FITNESSES[name]


class FitnessAccumulator:
    """Mean of per-batch fitness values over the calibration batches (a batch mean, not a per-image mean).

    Sum and count are kept as tensors on the device of the values, so that under DDP (each rank holding
    different batches) `total()` and `count()` can be all-reduced with SUM and divided, without a host sync
    per batch.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._device = torch.device(device) if device is not None else None
        self._total: torch.Tensor | None = None
        self._count = 0

    def add(self, value: torch.Tensor | float) -> None:
        """Add one batch's fitness (a scalar)."""
        v = torch.as_tensor(value).detach()
        if v.numel() != 1:
            raise ValueError(
                f"add() expects one scalar per batch, got shape {tuple(v.shape)}; reduce the batch first"
            )
        if self._device is None:
            self._device = v.device
        v = v.reshape(()).to(device=self._device, dtype=torch.float64)
        self._total = v if self._total is None else self._total + v
        self._count += 1

    def total(self) -> torch.Tensor:
        """Sum of the added values, float64 0-dim tensor (zero if nothing was added)."""
        if self._total is None:
            return torch.zeros((), dtype=torch.float64, device=self._device)
        return self._total

    def count(self) -> torch.Tensor:
        """Number of added batches, float64 0-dim tensor on the device of `total()` (all-reduce friendly)."""
        return torch.tensor(float(self._count), dtype=torch.float64, device=self._device)

    def mean(self) -> float:
        """Mean of the added per-batch values on this process only."""
        return self.mean_of(self.total(), self.count())

    @staticmethod
    def mean_of(total: torch.Tensor, count: torch.Tensor) -> float:
        """Mean from (possibly all-reduced) total and count; NaN/inf pass through for the search to reject."""
        n = float(count)
        if n <= 0:
            raise ValueError(
                "no fitness values were added; call add() once per calibration batch before mean()"
            )
        return float(total) / n

    def reset(self) -> None:
        """Forget all values, keeping the device."""
        self._total = None
        self._count = 0
