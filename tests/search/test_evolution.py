"""Evolutionary core: selection, replacement, mutation, checkpointing and a toy optimisation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from evolq_pl.search.evolution import Individual, Population, evolve, generation, mutate


def _pop(fitnesses: list[float]) -> Population:
    return Population([Individual(f, torch.full((3,), float(i + 1)), i) for i, f in enumerate(fitnesses)])


def test_from_initial_copies() -> None:
    s = torch.tensor([0.5, 1.0])
    pop = Population.from_initial(s, 2.0, 4)
    assert len(pop) == 4 and pop.next_uid == 4
    assert [m.uid for m in pop] == [0, 1, 2, 3]
    assert all(m.fitness == 2.0 and torch.equal(m.scales, s) for m in pop)
    assert pop.best().uid == 0


def test_tournament_with_replacement_picks_min_of_draw() -> None:
    fits = [5.0, 1.0, 7.0, 3.0, 9.0, 2.0, 8.0]
    pop = _pop(fits)
    rng, replay = np.random.default_rng(123), np.random.default_rng(123)
    for _ in range(20):
        winner = pop.tournament(3, rng)
        idx = replay.integers(0, len(fits), size=3)
        assert winner.uid == min(idx.tolist(), key=lambda i: fits[i])
    assert rng.bit_generator.state == replay.bit_generator.state


def test_tournament_ties_broken_by_lowest_uid() -> None:
    pop = _pop([1.0] * 6)
    rng, replay = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(10):
        assert pop.tournament(2, rng).uid == min(replay.integers(0, 6, size=2).tolist())


def test_add_and_drop_worst() -> None:
    pop = _pop([1.0, 4.0, 2.0])
    dropped = pop.add_and_drop_worst(Individual(9.0, torch.ones(3), pop.next_uid))
    assert dropped.uid == 3 and len(pop) == 3 and pop.next_uid == 4
    # A child tying the worst loses the tie (higher uid).
    dropped = pop.add_and_drop_worst(Individual(4.0, torch.ones(3), pop.next_uid))
    assert dropped.uid == 4 and sorted(m.uid for m in pop) == [0, 1, 2]
    # A better child survives and the worst member goes.
    dropped = pop.add_and_drop_worst(Individual(0.5, torch.ones(3), pop.next_uid))
    assert dropped.uid == 1 and pop.best().uid == 5 and len(pop) == 3
    with pytest.raises(ValueError, match="uid"):
        pop.add_and_drop_worst(Individual(0.1, torch.ones(3), 0))


def test_identical_population_ties_drop_highest_uid() -> None:
    pop = Population.from_initial(torch.ones(2), 1.0, 3)
    dropped = pop.add_and_drop_worst(Individual(0.5, torch.zeros(2), pop.next_uid))
    assert dropped.uid == 2 and pop.best().uid == 3


def test_non_finite_fitness_never_wins() -> None:
    assert Individual(float("nan"), torch.ones(1), 0).fitness == math.inf
    assert Individual(-math.inf, torch.ones(1), 0).fitness == math.inf
    pop = _pop([float("nan"), -math.inf, 100.0, math.inf])
    assert pop.best().uid == 2
    rng, replay = np.random.default_rng(0), np.random.default_rng(0)
    for _ in range(30):
        drawn = replay.integers(0, 4, size=2).tolist()
        # The finite member wins whenever drawn; otherwise all are +inf and the lowest uid wins.
        assert pop.tournament(2, rng).uid == (2 if 2 in drawn else min(drawn))
    dropped = pop.add_and_drop_worst(Individual(float("nan"), torch.ones(3), pop.next_uid))
    assert dropped.uid == 4


def test_mutate_matches_noise_and_is_reproducible() -> None:
    eps = 1e-3
    parent = torch.tensor([0.5, 0.01, 2.0, 1e-4, 0.0], dtype=torch.float64)
    child = mutate(parent, eps, np.random.default_rng(5))
    u = torch.from_numpy(np.random.default_rng(5).uniform(-eps, eps, size=5))
    assert torch.equal(child, (parent + u).abs().clamp_min(torch.finfo(torch.float32).eps))
    assert bool((u.abs() <= eps).all()) and bool((child > 0).all())
    big = parent[:3]
    assert bool(((mutate(big, eps, np.random.default_rng(5)) - big).abs() <= eps).all())
    assert torch.equal(child, mutate(parent, eps, np.random.default_rng(5)))
    assert not torch.equal(child, mutate(parent, eps, np.random.default_rng(6)))


def test_mutate_keeps_dtype_shape_and_relative_mode() -> None:
    parent = torch.tensor([[0.5, 2.0], [8.0, 0.125]])
    child = mutate(parent, 1e-2, np.random.default_rng(1))
    assert child.dtype == torch.float32 and child.shape == parent.shape
    assert mutate(parent.bfloat16(), 1e-2, np.random.default_rng(1)).dtype == torch.bfloat16
    rel = mutate(parent.double(), 1e-2, np.random.default_rng(2), relative=True)
    u = torch.from_numpy(np.random.default_rng(2).uniform(-1e-2, 1e-2, size=4)).reshape(2, 2)
    assert torch.allclose(rel / parent.double() - 1.0, u, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="eps"):
        mutate(parent, 0.0, np.random.default_rng(0))


def test_mutate_never_returns_zero() -> None:
    # With eps large next to a tiny scale the reflection can land arbitrarily close to 0; the clamp stops 0.
    child = mutate(torch.zeros(1000), 1e-6, np.random.default_rng(0))
    assert bool((child >= torch.finfo(torch.float32).eps).all())


def _distance(target: torch.Tensor):
    return lambda s: float(((s.double() - target) ** 2).sum())


def test_state_dict_round_trip_resumes_exactly() -> None:
    target = torch.linspace(0.9, 1.1, 6, dtype=torch.float64)
    evaluate = _distance(target)
    rng = np.random.default_rng(11)
    pop = Population.from_initial(torch.ones(6), evaluate(torch.ones(6)), 5)
    for _ in range(10):
        generation(pop, evaluate, 1e-2, 3, rng)
    state, rng_state = pop.state_dict(), copy.deepcopy(rng.bit_generator.state)

    restored = Population.from_initial(torch.zeros(1), 0.0, 1)
    restored.load_state_dict(state)
    assert restored.next_uid == pop.next_uid == 15
    assert [(m.fitness, m.uid) for m in restored] == [(m.fitness, m.uid) for m in pop]
    assert all(torch.equal(a.scales, b.scales) for a, b in zip(restored, pop, strict=True))

    rng2 = np.random.default_rng()
    rng2.bit_generator.state = rng_state
    for _ in range(10):
        a, kept_a = generation(pop, evaluate, 1e-2, 3, rng)
        b, kept_b = generation(restored, evaluate, 1e-2, 3, rng2)
        assert (a.fitness, a.uid, kept_a) == (b.fitness, b.uid, kept_b)
        assert torch.equal(a.scales, b.scales)


def test_generation_improves_toy_objective() -> None:
    target = torch.tensor([1.02, 0.97, 1.01, 0.99, 1.03, 0.98], dtype=torch.float64)
    evaluate = _distance(target)
    start = torch.ones(6)
    pop = Population.from_initial(start, evaluate(start), 15)
    rng = np.random.default_rng(0)
    best = [pop.best().fitness]
    survived = 0
    for _ in range(300):
        child, kept = generation(pop, evaluate, 2e-3, 10, rng)
        survived += kept
        assert kept == any(m.uid == child.uid for m in pop)
        assert len(pop) == 15
        best.append(pop.best().fitness)
    assert all(b1 <= b0 for b0, b1 in zip(best, best[1:], strict=False))
    assert best[-1] < 0.5 * best[0] and survived > 0


def test_evolve_returns_best_after_cycles() -> None:
    evaluate = _distance(torch.full((4,), 2.0, dtype=torch.float64))
    pop = Population.from_initial(torch.ones(4), evaluate(torch.ones(4)), 15)
    best = evolve(pop, evaluate, 1e-3, 10, 3, np.random.default_rng(3))
    assert pop.next_uid == 18 and best is pop.best() and best.fitness <= evaluate(torch.ones(4))
