"""Block order, mutation step size and the hyperparameters of the Evol-Q search (reference §2.1-2.3)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any


def block_schedule(num_blocks: int, num_passes: int) -> list[int]:
    """Block indices in visiting order: last block to first, repeated `num_passes` times, as the reference."""
    if num_blocks < 1:
        raise ValueError(
            f"num_blocks must be >= 1, got {num_blocks}; the model has no searchable attention block"
        )
    if num_passes < 1:
        raise ValueError(
            f"num_passes must be >= 1, got {num_passes}; set num_passes to 1 or more (reference: 10)"
        )
    return list(range(num_blocks - 1, -1, -1)) * num_passes


def default_eps(bits: int) -> float:
    """Reference absolute mutation half-width: 1e-3 for 3/4-bit, 1e-4 for 8-bit, else 1e-3 and a warning."""
    if bits in (3, 4):
        return 1e-3
    if bits == 8:
        return 1e-4
    warnings.warn(
        f"no default mutation eps for {bits}-bit weights; using 1e-3 (set SearchConfig.eps to choose)",
        stacklevel=2,
    )
    return 1e-3


def is_count(value: object, minimum: int = 0) -> bool:
    """Whether a setting is a whole number >= ``minimum`` (a bool is not one, though Python counts it an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_share(value: object) -> bool:
    """Whether a setting is a share of something in (0, 1] (a bool is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1


def _check_positive_int(name: str, value: object) -> None:
    if not is_count(value, 1):
        raise ValueError(
            f"SearchConfig.{name} must be an integer >= 1, got {value!r}; set it to a positive integer"
        )


@dataclass(frozen=True)
class SearchConfig:
    """Search hyperparameters; defaults are the reference's (population 15, tournament 10, K=3, P=10)."""

    population_size: int = 15
    tournament_size: int = 10
    num_cycles: int = 3
    """Generations (one child each) per block visit."""
    num_passes: int = 10
    eps: float | None = None
    """Mutation half-width; None means `default_eps(bits)` of the block's weights."""
    relative_mutation: bool = False
    """Scale the noise by |s| (child = |s(1+u)|) instead of the reference's absolute noise."""
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """Settings of the chosen strategy beyond these (e.g. ``{"sigma": 0.03}`` for ``cmaes``); each strategy checks
    its own."""

    def __post_init__(self) -> None:
        for name in ("population_size", "tournament_size", "num_cycles", "num_passes"):
            _check_positive_int(name, getattr(self, name))
        if self.eps is not None and (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, (int, float))
            or not (math.isfinite(self.eps) and self.eps > 0)
        ):
            raise ValueError(
                f"SearchConfig.eps must be a finite number > 0 or None, got {self.eps!r}; use e.g. 1e-3"
            )
        if not isinstance(self.relative_mutation, bool):
            raise ValueError(
                f"SearchConfig.relative_mutation must be True or False, got {self.relative_mutation!r}"
            )

        if not isinstance(self.strategy_options, dict) or not all(isinstance(k, str) for k in self.strategy_options):
            raise ValueError(f"SearchConfig.strategy_options must be a dict of named settings, got "
                             f"{self.strategy_options!r}; write e.g. {{'sigma': 0.03}}")

    def resolve_eps(self, bits: int) -> float:
        """The eps to use for a block whose weights have `bits` bits."""
        return float(self.eps) if self.eps is not None else default_eps(bits)
