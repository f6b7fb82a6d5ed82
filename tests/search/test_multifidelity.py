"""Multi-fidelity screening (``strategy: multifidelity``): honest evaluation counts, only full-set scores reach the
model, exact resume between its screening and re-scoring generations, selectable through the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from evolq_pl.search.engine import SearchEngine, same_state
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.search.strategies import get_strategy, strategy_names
from evolq_pl.search.strategies.multifidelity import MultiFidelity
from evolq_pl.testing import ToyEvaluator, fit_with_strategy, interrupt_and_resume, toy_engine
from evolq_pl.testing import run_search as run

OPTIONS = {"screen": 6, "fraction": 0.25, "rescore": 2}  # ToyEvaluator: one of its 4 coordinate groups
CONFIG = SearchConfig(num_cycles=4, num_passes=2, eps=2e-2, strategy_options=OPTIONS)
SIZES = (5, 3, 4)


def make_engine(evaluator: ToyEvaluator | None = None, seed: int = 7) -> SearchEngine:
    return toy_engine(CONFIG, "multifidelity", seed, evaluator, SIZES)


def test_registered_and_selected_by_name():
    assert "multifidelity" in strategy_names() and get_strategy("multifidelity") is MultiFidelity


def test_screens_on_a_share_rescores_on_all_and_counts_each_at_its_cost():
    engine = make_engine()
    reports = run(engine)
    assert [len(r.fitnesses) for r in reports[:4]] == [6, 2, 6, 2]
    rounds = engine.num_visits * CONFIG.num_cycles // 2
    assert engine.state.evaluations == pytest.approx(1 + rounds * (6 * 0.25 + 2))
    assert all(r.accepted == 0 for r in reports[::2])  # a screening score never reaches the model
    best = [r.best_fitness for r in reports]
    assert all(b <= a for a, b in zip(best, best[1:], strict=False))
    assert engine.evaluator.fitness() == best[-1] < engine.state.baseline_fitness
    for screen, rescore in zip(reports[::2], reports[1::2], strict=True):  # the re-scored are the screen's best two
        assert sorted(screen.fitnesses)[:2] != rescore.fitnesses  # cheap and full fitness differ...
        if rescore.accepted:
            assert min(rescore.fitnesses) == rescore.best_fitness  # ...and only the full one is kept


@pytest.mark.parametrize("stop_after", [1, 2, 3, 9])  # after a screen, a round, a screen in a visit, a later one
def test_save_and_restore_between_screen_and_rescore_continues_exactly(stop_after):
    reference, ref_reports, resumed, reports = interrupt_and_resume(make_engine, stop_after)
    assert [r.fitnesses for r in reports] == [r.fitnesses for r in ref_reports]
    assert all(torch.equal(resumed.evaluator.get(b), reference.evaluator.get(b)) for b in range(len(SIZES)))
    assert same_state(resumed.state_dict(), reference.state_dict())


def test_a_screen_with_no_finite_score_screens_again():
    evaluator = ToyEvaluator()
    evaluator.poison = set(range(2, 8))  # the whole first screen (evaluation 1 is the baseline)
    engine = make_engine(evaluator)
    first, second = engine.step(), engine.step()
    assert all(math.isnan(f) for f in first.fitnesses) and len(second.fitnesses) == 6


def test_an_evaluator_without_partial_scoring_is_refused_with_the_fix():
    class Plain(ToyEvaluator):
        evaluate_many = None

    with pytest.raises(RuntimeError, match="scores candidates on 25% of the calibration set, which Plain cannot"):
        make_engine(Plain()).step()


@pytest.mark.parametrize(("options", "cycles", "message"), [
    ({"fraction": 0.0}, 2, r"fraction must be in \(0, 1\], got 0.0"),
    ({"screen": 2, "rescore": 3}, 2, r"rescore \(3\) cannot exceed screen \(2\)"),
    ({}, 3, "num_cycles must be even, got 3; give num_cycles: 2"),
])
def test_bad_settings_say_what_to_fix(options, cycles, message):
    with pytest.raises(ValueError, match=message):
        MultiFidelity(SearchConfig(num_cycles=cycles, strategy_options=options))


def test_a_config_selects_multifidelity_through_the_cli(tmp_path, tiny_vit_checkpoint):
    cli = fit_with_strategy(tiny_vit_checkpoint, tmp_path, "multifidelity", "{screen: 4, fraction: 0.5, rescore: 1}",
                            num_cycles=2, batch_size=16)
    engine = cli.model.engine
    assert type(engine.state.strategy) is MultiFidelity and engine.done
    assert engine.state.evaluations == 1 + 3 * (4 * 0.5 + 1)  # 4 batches: the screens score 2 of them
    assert engine.state.current_fitness < engine.state.baseline_fitness
