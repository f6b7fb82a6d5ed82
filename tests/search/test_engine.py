"""The search engine on its own, without Lightning or a model: schedule, counters, exact save/restore, snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evolq_pl.search.engine import NonFiniteBaseline, SearchEngine, same_state
from evolq_pl.search.evolution import Population, generation
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.testing import ToyEvaluator, toy_engine
from evolq_pl.testing import run_search as run
from evolq_pl.testing import through_checkpoint as roundtrip

CONFIG = SearchConfig(population_size=4, tournament_size=3, num_cycles=2, num_passes=2, eps=2e-2)
SIZES = (5, 3, 4)  # ToyEvaluator's three blocks of scales


def make_engine(evaluator: ToyEvaluator | None = None, seed: int = 7) -> SearchEngine:
    return toy_engine(CONFIG, "evolq", seed, evaluator, SIZES)


def test_visits_blocks_last_to_first_and_counts_generations_and_evaluations():
    engine = make_engine()
    reports = run(engine)
    evaluator = engine.evaluator
    assert engine.num_visits == 6 and len(reports) == 6 * 2
    assert evaluator.started == evaluator.ended == [2, 1, 0, 2, 1, 0]  # each visit's inputs are freed at its end
    assert [(r.visit, r.block, r.pass_index, r.index) for r in reports[:3]] == [(0, 2, 0, 1), (0, 2, 0, 2),
                                                                               (1, 1, 0, 1)]
    assert [r.visit_summary is not None for r in reports] == [False, True] * 6
    assert engine.state.evaluations == reports[-1].evaluations == 1 + 12  # the baseline, then one child each
    assert engine.next_visit == 6
    with pytest.raises(RuntimeError, match="the search is finished: all 6 block visits are done"):
        engine.step()


def test_the_model_holds_the_best_scales_and_the_fitness_never_rises():
    engine = make_engine()
    reports = run(engine)
    best = [r.best_fitness for r in reports]
    assert all(b <= a for a, b in zip(best, best[1:], strict=False))
    assert engine.state.current_fitness == best[-1] == engine.evaluator.fitness()
    assert engine.state.current_fitness < engine.state.baseline_fitness
    assert sum(r.accepted for r in reports) > 0


def test_one_visit_is_exactly_todays_steady_state_generations():
    """The strategy's ask/tell reproduces ``generation()`` draw for draw (the pinned test checks whole runs)."""
    engine = make_engine(seed=11)
    first = [engine.step() for _ in range(CONFIG.num_cycles)]
    toy = ToyEvaluator()
    toy.prepared = 2
    rng = np.random.default_rng(11)
    pop = Population.from_initial(toy.get(2), toy.fitness(), CONFIG.population_size)
    for _ in range(CONFIG.num_cycles):
        child, _ = generation(pop, lambda s: toy.evaluate(2, s), CONFIG.eps, CONFIG.tournament_size, rng)
        toy.apply(2, pop.best().scales)
    assert [r.best_fitness for r in first][-1] == pop.best().fitness
    assert torch.equal(engine.evaluator.get(2), toy.get(2))
    assert engine.state.rng.bit_generator.state == rng.bit_generator.state


@pytest.mark.parametrize("stop_after", [1, 2, 5, 11])  # inside a visit, at a visit's end, later ones
def test_save_and_restore_then_continue_ends_bitwise_like_an_uninterrupted_engine(stop_after):
    reference = make_engine()
    run(reference)

    first = make_engine()
    for _ in range(stop_after):
        first.step()
    state, scales = roundtrip(first.state_dict()), [first.evaluator.get(b) for b in range(len(SIZES))]

    evaluator = ToyEvaluator()
    for block, s in enumerate(scales):  # the model's scales come back from the checkpoint's quantizer buffers
        evaluator.apply(block, s)
    resumed = make_engine(evaluator, seed=123)  # another seed: the generator's state must come from the checkpoint
    resumed.load_state_dict(state)
    if stop_after % CONFIG.num_cycles:  # resumed inside a visit: the engine prepares that block again
        resumed.step()
        assert evaluator.started[0] == reference.schedule[stop_after // CONFIG.num_cycles]
    run(resumed)

    assert all(torch.equal(evaluator.get(b), reference.evaluator.get(b)) for b in range(len(SIZES)))
    assert same_state(resumed.state_dict(), reference.state_dict())


def test_a_state_from_another_version_is_refused_with_its_missing_fields():
    engine = make_engine()
    state = engine.state_dict()
    del state["evaluations"]
    with pytest.raises(ValueError, match=r"lacks \['evaluations'\]: it was written by another version"):
        make_engine().load_state_dict(state)


def test_a_nonfinite_baseline_stops_the_engine():
    evaluator = ToyEvaluator()
    evaluator.poison = {1}
    with pytest.raises(NonFiniteBaseline, match="starting model's fitness is nan"):
        make_engine(evaluator).step()


def test_a_nonfinite_candidate_is_rejected_and_the_model_keeps_its_scales():
    evaluator = ToyEvaluator()
    evaluator.poison = {2}  # the first child
    engine = make_engine(evaluator)
    report = engine.step()
    assert math.isnan(report.fitnesses[0]) and report.accepted == 0
    assert report.best_fitness == engine.state.baseline_fitness
    assert all(torch.equal(evaluator.get(b), torch.ones(n)) for b, n in enumerate(SIZES))


def test_heldout_snapshot_and_baseline_are_whole_model_snapshots():
    engine = make_engine()
    for _ in range(4):
        engine.step()
    assert engine.offer_heldout(50.0) and not engine.offer_heldout(40.0)
    kept = engine.snapshot()
    run(engine)
    searched = engine.snapshot()
    with engine.at_baseline():
        assert all(torch.equal(s, torch.ones(n)) for s, n in zip(engine.snapshot(), SIZES, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(engine.snapshot(), searched, strict=True))
    engine.restore(engine.state.best_snapshot)
    assert engine.state.best_heldout == 50.0
    assert all(torch.equal(a, b) for a, b in zip(engine.snapshot(), kept, strict=True))


def test_bad_engine_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="one mutation eps per block: 2 for 3 blocks"):
        SearchEngine(3, [1e-3, 1e-3], CONFIG)
    with pytest.raises(ValueError, match="unknown search strategy 'annealing': choose one of cmaes, evolq, gradient, localscreen, multifidelity"):
        SearchEngine(3, [1e-3] * 3, CONFIG, strategy="annealing")
    with pytest.raises(RuntimeError, match="no evaluator"):
        SearchEngine(3, [1e-3] * 3, CONFIG).step()
