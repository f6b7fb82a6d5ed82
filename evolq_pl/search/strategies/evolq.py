"""Evol-Q's steady-state evolution (reference §2.3), the default strategy: ``strategy: evolq``.

Each visit seeds a population with copies of the block's current scales; each generation mutates the winner of one
tournament into a single child, scores it, inserts it and drops the worst member (``search/evolution.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from evolq_pl.search.evolution import Population, admit, propose
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.search.strategies.base import Strategy


class SteadyStateEvolution(Strategy):
    """Population ``population_size``, tournament ``tournament_size`` with replacement, one child per generation."""

    name = "evolq"

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        self.population: Population | None = None
        self.eps: float | None = None

    def _members(self) -> Population:
        if self.population is None:
            raise RuntimeError("the strategy has no visit in progress: call start_visit first")
        return self.population

    def start_visit(self, scales: torch.Tensor, fitness: float, eps: float, rng: np.random.Generator) -> None:
        self.population = Population.from_initial(scales, fitness, self.config.population_size)
        self.eps = eps

    def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
        return [propose(self._members(), self.eps, self.config.tournament_size, rng, self.config.relative_mutation)]

    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        return [admit(self._members(), c, f)[1] for c, f in zip(candidates, fitnesses, strict=True)]

    def best(self) -> tuple[torch.Tensor, float]:
        best = self._members().best()
        return best.scales, best.fitness

    def stats(self) -> dict[str, float]:
        finite = [m.fitness for m in self._members() if math.isfinite(m.fitness)]
        return {"mean_fitness": float(np.mean(finite)) if finite else math.inf}

    def state_dict(self) -> dict[str, Any]:
        return {"population": None if self.population is None else self.population.state_dict(), "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.population = None if state["population"] is None else Population.from_state_dict(state["population"])
        self.eps = state["eps"]
