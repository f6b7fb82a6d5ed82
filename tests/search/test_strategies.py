"""The Strategy interface and its registry: a second strategy needs only its own class, and may ask for many."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from evolq_pl.search.engine import SearchEngine
from evolq_pl.search.evolution import mutate
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.search.strategies import Strategy, base, get_strategy, strategy_names
from evolq_pl.search.strategies.evolq import SteadyStateEvolution
from evolq_pl.testing import ToyEvaluator

CONFIG = SearchConfig(population_size=4, tournament_size=3, num_cycles=2, num_passes=2, eps=2e-2)


@pytest.fixture
def best_of_three():
    """A strategy written the way a new file in evolq_pl/search/strategies/ would be, removed again afterwards."""

    class BestOfThree(Strategy):
        """Each generation asks for three mutations of the best scales so far and keeps the best of all."""

        name = "test_best_of_three"

        def start_visit(self, scales, fitness, eps, rng) -> None:
            self.scales, self.fitness, self.eps = scales, fitness, eps

        def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
            return [mutate(self.scales, self.eps, rng) for _ in range(3)]

        def tell(self, candidates, fitnesses) -> list[bool]:
            kept = [False] * len(candidates)
            for i, (c, f) in enumerate(zip(candidates, fitnesses, strict=True)):
                if f < self.fitness:
                    self.scales, self.fitness = c, f
                    kept = [False] * len(candidates)
                    kept[i] = True
            return kept

        def best(self) -> tuple[torch.Tensor, float]:
            return self.scales, self.fitness

        def state_dict(self) -> dict[str, Any]:
            return {"scales": self.scales, "fitness": self.fitness, "eps": self.eps}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.scales, self.fitness, self.eps = state["scales"], state["fitness"], state["eps"]

    try:
        yield BestOfThree
    finally:
        base._REGISTRY.pop(BestOfThree.name, None)


def test_evolq_is_registered_and_the_default():
    assert "evolq" in strategy_names()
    assert get_strategy("evolq") is SteadyStateEvolution
    assert type(SearchEngine(1, [1e-3], CONFIG).state.strategy) is SteadyStateEvolution


def test_a_new_strategy_is_selectable_by_name_and_may_ask_for_several_candidates(best_of_three):
    assert best_of_three.name in strategy_names()
    engine = SearchEngine(3, [CONFIG.eps] * 3, CONFIG, best_of_three.name, seed=0, evaluator=ToyEvaluator())
    reports = []
    while not engine.done:
        reports.append(engine.step())
    assert all(len(r.fitnesses) == 3 for r in reports)
    assert engine.state.evaluations == 1 + 3 * len(reports)  # strategies are compared at equal evaluation counts
    assert all(r.accepted <= 1 for r in reports) and sum(r.accepted for r in reports) > 0
    assert engine.state.current_fitness == engine.evaluator.fitness() < engine.state.baseline_fitness


def test_two_strategies_cannot_share_a_name():
    with pytest.raises(ValueError, match="two search strategies are named 'evolq'"):
        type("Impostor", (SteadyStateEvolution,), {"name": "evolq"})


def test_asking_before_a_visit_says_what_is_missing():
    with pytest.raises(RuntimeError, match="no visit in progress: call start_visit first"):
        SteadyStateEvolution(CONFIG).ask(np.random.default_rng(0))
