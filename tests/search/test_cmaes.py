"""CMA-ES (``strategy: cmaes``): registered, selectable from a config, lowers the fitness, and resumes exactly."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from evolq_pl.search.engine import SearchEngine, same_state
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.search.strategies import get_strategy, strategy_names
from evolq_pl.search.strategies.cmaes import CMAES, dump_es, load_es
from evolq_pl.testing import ToyEvaluator, fit_with_strategy, interrupt_and_resume, toy_engine
from evolq_pl.testing import run_search as run

CONFIG = SearchConfig(num_cycles=3, num_passes=2, eps=2e-2, strategy_options={"popsize": 4, "sigma": 0.05,
                                                                                "diagonal_above": 4})
SIZES = (5, 3, 4)  # ToyEvaluator's blocks: the 5-value one runs the separable variant, the others full covariance


def make_engine(evaluator: ToyEvaluator | None = None, seed: int = 7) -> SearchEngine:
    return toy_engine(CONFIG, "cmaes", seed, evaluator, SIZES)


def es_core(es) -> list:
    """What the next generation of a cma object depends on: distribution, paths, step size, counters."""
    return [es.mean, es.sigma, es.sm.variances if hasattr(es.sm, "variances") else es.sm.C, es.pc,
            getattr(es.adapt_sigma, "ps", None), es.countiter, es.countevals, es.sigma_vec.scaling]


def test_cmaes_is_registered_and_selected_by_name():
    assert "cmaes" in strategy_names() and get_strategy("cmaes") is CMAES
    assert type(make_engine().state.strategy) is CMAES


def test_a_search_lowers_the_fitness_at_popsize_evaluations_per_generation():
    engine = make_engine()
    reports = run(engine)
    assert all(len(r.fitnesses) == 4 for r in reports)
    assert engine.state.evaluations == 1 + engine.num_visits * CONFIG.num_cycles * 4
    best = [r.best_fitness for r in reports]
    assert all(b <= a for a, b in zip(best, best[1:], strict=False))  # the model holds the best scored scales
    assert engine.evaluator.fitness() == best[-1] < 0.5 * engine.state.baseline_fitness
    assert sum(r.accepted for r in reports) > 0 and all(r.accepted <= 1 for r in reports)


def test_candidates_come_from_the_engines_generator_only():
    np.random.seed(0)
    first = run(make_engine(seed=5))
    np.random.seed(1)  # numpy's global generator, which cma would use by default
    second = run(make_engine(seed=5))
    assert [r.fitnesses for r in first] == [r.fitnesses for r in second]
    assert [r.fitnesses for r in first] != [r.fitnesses for r in run(make_engine(seed=6))]


@pytest.mark.parametrize("stop_after", [1, 2, 3, 8])  # inside a visit (twice), at a visit's end, a later visit
def test_save_and_restore_mid_visit_continues_exactly(stop_after):
    reference, ref_reports, resumed, reports = interrupt_and_resume(make_engine, stop_after)

    assert [r.fitnesses for r in reports] == [r.fitnesses for r in ref_reports]
    assert all(torch.equal(resumed.evaluator.get(b), reference.evaluator.get(b)) for b in range(len(SIZES)))
    a, b = resumed.state_dict(), reference.state_dict()
    es_a, es_b = a["strategy"].pop("es"), b["strategy"].pop("es")
    assert same_state(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(es_core(load_es(es_a)), es_core(load_es(es_b)), strict=True))


def test_the_pickled_library_state_holds_no_clock_and_loads_nothing_else():
    states = []
    for _ in range(2):  # two runs, apart in time: the same bytes
        engine = make_engine()
        engine.step()
        time.sleep(0.01)
        states.append(dump_es(engine.state.strategy.es))
    assert torch.equal(*states)
    evil = torch.frombuffer(bytearray(pickle.dumps(print)), dtype=torch.uint8)
    with pytest.raises(pickle.UnpicklingError, match="may not name builtins.print"):
        load_es(evil)


def test_bad_options_say_what_to_fix():
    with pytest.raises(ValueError, match="strategy 'cmaes' has no option 'sigmaa': it understands diagonal_above, "
                                         "popsize, sigma"):
        CMAES(SearchConfig(strategy_options={"sigmaa": 0.1}))
    with pytest.raises(ValueError, match="popsize must be an integer >= 2"):
        CMAES(SearchConfig(strategy_options={"popsize": 1}))
    with pytest.raises(ValueError, match="sigma must be a number > 0"):
        CMAES(SearchConfig(strategy_options={"sigma": -1.0}))
    with pytest.raises(ValueError, match="strategy 'evolq' has no option 'popsize': it understands none"):
        SearchEngine(1, [1e-3], SearchConfig(strategy_options={"popsize": 3}))


def test_a_config_selects_cmaes_through_the_cli(tmp_path, tiny_vit_checkpoint):
    cli = fit_with_strategy(tiny_vit_checkpoint, tmp_path, "cmaes", "{popsize: 3, sigma: 0.02}", num_cycles=2,
                            batch_size=32)
    engine = cli.model.engine
    assert type(engine.state.strategy) is CMAES and engine.done
    assert engine.state.evaluations == 1 + 3 * 2 * 3  # the baseline, then 3 blocks x 2 generations x popsize 3
    assert engine.state.current_fitness < engine.state.baseline_fitness
