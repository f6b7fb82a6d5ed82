"""Multi-fidelity screening: ``strategy: multifidelity``.

The paper's search scores 3 mutations per block visit on the whole calibration set. Candidates that differ by one
mutation step are ranked almost the same by a few batches as by all of them (the batches are shared, so their noise
is common to every candidate), so here each round screens ``screen`` mutations of the block's best scales on the
first ``fraction`` of the calibration batches, then re-scores the ``rescore`` best of them on all batches; only a
full-set fitness ever replaces the model's scales. A round is two generations (screen, re-score) and costs
``screen * share + rescore`` full-set evaluations, where ``share`` is the whole-batch share actually scored
(``SuffixEvaluator.calibration_share``): 10 x 0.1 + 2 = 3, the paper's 3 per visit, at ``num_cycles: 2``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from evolq_pl.search.evolution import mutate
from evolq_pl.search.schedule import SearchConfig, is_count, is_share
from evolq_pl.search.strategies.base import KeepsBest


class MultiFidelity(KeepsBest):
    """Screen many mutations of the best scales on a few batches, re-score the best few on all, keep the best."""

    name = "multifidelity"
    options = {"screen": 10, "fraction": 0.1, "rescore": 2}
    """``screen``: mutations per round; ``fraction``: share of the calibration batches they are scored on;
    ``rescore``: how many of the best screened go on to the full calibration set."""

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        screen, fraction, rescore = self.option("screen"), self.option("fraction"), self.option("rescore")
        for key, value in (("screen", screen), ("rescore", rescore)):
            if not is_count(value, 1):
                raise ValueError(f"multifidelity {key} must be an integer >= 1, got {value!r}")
        if rescore > screen:
            raise ValueError(f"multifidelity rescore ({rescore}) cannot exceed screen ({screen})")
        if not is_share(fraction):
            raise ValueError(f"multifidelity fraction must be in (0, 1], got {fraction!r}; e.g. 0.1 (one batch in 10)")
        if config.num_cycles % 2:
            raise ValueError(f"multifidelity alternates a screening and a re-scoring generation, so num_cycles must be "
                             f"even, got {config.num_cycles}; give num_cycles: 2 for one round per visit")
        self.shortlist: list[torch.Tensor] = []
        self.screening = True
        """Whether the last ``ask`` (or the next, between generations) is a screening one."""

    def start_visit(self, scales: torch.Tensor, fitness: float, eps: float, rng: np.random.Generator) -> None:
        super().start_visit(scales, fitness, eps, rng)
        self.shortlist, self.screening = [], True

    def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
        best = self._best()
        self.screening = not self.shortlist  # a screen that scored nothing finite is followed by another screen
        if self.screening:
            return [mutate(best, self.eps, rng, self.config.relative_mutation) for _ in range(self.option("screen"))]
        return list(self.shortlist)

    def fidelity(self) -> float:
        return float(self.option("fraction")) if self.screening else 1.0

    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        if self.screening:
            order = sorted((f, i) for i, f in enumerate(fitnesses) if math.isfinite(f))  # ties: the earlier
            self.shortlist = [candidates[i] for _, i in order[:self.option("rescore")]]
            return [False] * len(candidates)
        self.shortlist = []
        return self.keep(candidates, fitnesses)

    def stats(self) -> dict[str, float]:
        return {"screening": float(self.screening)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shortlist": [c.clone() for c in self.shortlist], "screening": self.screening}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shortlist, self.screening = [c.clone() for c in state["shortlist"]], bool(state["screening"])
