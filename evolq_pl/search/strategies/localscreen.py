"""Layer-local screening: ``strategy: localscreen``.

The paper's mutation moves every scale of a block at once, so whether one step helps is decided for all of them
together, and most of what a step could gain is lost to the scales it moved the wrong way. A weight scale is per
output channel, and a channel's output depends on its own scale only, so the error of a layer's output against its
FP output (``local_errors``: cheap, no pass over the model) can be minimised for every scale separately: each
candidate takes, scale by scale, the value with the lowest local error among the current one and ``screen`` of the
paper's random mutations. The global fitness decides: each visit scores ``candidates`` such recombinations on the
whole calibration set (3, the paper's budget per visit, at ``num_cycles: 1``) and keeps the best only if it beats
the block's current fitness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evolq_pl.search.evolution import mutate
from evolq_pl.search.schedule import SearchConfig, is_count
from evolq_pl.search.strategies.base import KeepsBest


def per_scale_best(pool: list[torch.Tensor], local_errors: Callable[[list[torch.Tensor]], torch.Tensor]
                   ) -> torch.Tensor:
    """Scale by scale, the value among ``pool``'s vectors with the lowest layer-local error (the earlier wins a
    tie): separable, since a channel's output depends on its own scale only."""
    choice = local_errors(pool).argmin(dim=0)
    return torch.stack(pool).gather(0, choice.unsqueeze(0).to(pool[0].device)).squeeze(0)


def screened_mutation(best: torch.Tensor, screen: int, eps: float, relative: bool, rng: np.random.Generator,
                      local_errors: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """One candidate: scale by scale, the value with the lowest layer-local error among ``best``'s and ``screen`` of
    the paper's mutations of it (the current value wins a tie)."""
    return per_scale_best([best] + [mutate(best, eps, rng, relative) for _ in range(screen)], local_errors)


def grid_start(best: torch.Tensor, grid: list[float],
               local_errors: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """One candidate: each scale times the multiple in ``grid`` with the lowest layer-local error (the current
    value, 1, wins a tie). At 2-4 bits a min-max scale wastes grid levels on a row's extremes; a smaller multiple
    that clips them often gives the channel's output a far lower error, a jump no small mutation makes."""
    multiples = [1.0] + [float(m) for m in grid if m != 1]
    return per_scale_best([best * m for m in multiples], local_errors)


class LocalScreen(KeepsBest):
    """Per candidate, ``screen`` mutations of the best scales recombined scale by scale by their layer-local error."""

    name = "localscreen"
    options = {"screen": 16, "candidates": 3}
    """``screen``: mutations drawn per candidate, each scale choosing among them and its current value;
    ``candidates``: recombinations scored on the whole calibration set per generation."""

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        for key in ("screen", "candidates"):
            value = self.option(key)
            if not is_count(value, 1):
                raise ValueError(f"localscreen {key} must be an integer >= 1, got {value!r}")
        if config.num_cycles != 1:
            raise ValueError(f"localscreen reads the layers' inputs once per visit, so num_cycles must be 1 (one "
                             f"generation of {self.option('candidates')} candidates), got {config.num_cycles}")
        self.screened = 0

    def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
        best = self._best()
        local_errors = self.require_local_errors("localscreen")
        screen = self.option("screen")
        self.screened += screen * self.option("candidates")
        return [screened_mutation(best, screen, self.eps, self.config.relative_mutation, rng, local_errors)
                for _ in range(self.option("candidates"))]

    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        return self.keep(candidates, fitnesses)

    def stats(self) -> dict[str, float]:
        return {"local_screened": float(self.screened)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "screened": self.screened}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.screened = int(state["screened"])
