"""Layer-local screening (``strategy: localscreen``): each candidate is no worse than the current scales scale by
scale under the local error, only full-set scores reach the model, the budget is the paper's, resume is exact."""

from __future__ import annotations

import pytest
import torch

from evolq_pl.search.engine import SearchEngine, same_state
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.search.strategies import get_strategy, strategy_names
from evolq_pl.search.strategies.localscreen import LocalScreen
from evolq_pl.testing import ToyEvaluator, fit_with_strategy, interrupt_and_resume, toy_engine

CONFIG = SearchConfig(num_cycles=1, num_passes=3, eps=2e-2, strategy_options={"screen": 5, "candidates": 3})
SIZES = (5, 3, 4)


def make_engine(evaluator: ToyEvaluator | None = None, seed: int = 7) -> SearchEngine:
    return toy_engine(CONFIG, "localscreen", seed, evaluator, SIZES)


def test_registered_and_selected_by_name():
    assert "localscreen" in strategy_names() and get_strategy("localscreen") is LocalScreen


def test_candidates_are_locally_no_worse_scale_by_scale_and_only_full_scores_decide():
    engine = make_engine()
    evaluator = engine.evaluator
    reports = []
    while not engine.done:
        block = engine.schedule[engine.next_visit]
        before = evaluator.get(block)
        asked: list[list[torch.Tensor]] = []
        ask = LocalScreen.ask

        def spy(self, rng, asked=asked, ask=ask):
            asked.append(ask(self, rng))
            return asked[-1]

        LocalScreen.ask = spy
        try:
            reports.append(engine.step())
        finally:
            LocalScreen.ask = ask
        (cands,) = asked
        assert len(cands) == 3
        evaluator.prepared = block
        current = evaluator.local_errors(block, [before])[0]
        for c in cands:
            assert (evaluator.local_errors(block, [c])[0] <= current).all()  # per scale, never locally worse
            moved = c != before
            assert ((c - before).abs()[moved] <= CONFIG.eps).all()  # one mutation step at most
    assert engine.state.evaluations == 1 + engine.num_visits * 3  # the paper's 3 per visit
    best = [r.best_fitness for r in reports]
    assert all(b <= a for a, b in zip(best, best[1:], strict=False))
    assert sum(r.accepted for r in reports) > 0 and evaluator.fitness() == best[-1] < engine.state.baseline_fitness


@pytest.mark.parametrize("stop_after", [1, 4, 7])
def test_save_and_restore_continues_exactly(stop_after):
    reference, ref_reports, resumed, reports = interrupt_and_resume(make_engine, stop_after)
    assert [r.fitnesses for r in reports] == [r.fitnesses for r in ref_reports]
    assert all(torch.equal(resumed.evaluator.get(b), reference.evaluator.get(b)) for b in range(len(SIZES)))
    assert same_state(resumed.state_dict(), reference.state_dict())


def test_an_evaluator_without_local_errors_is_refused_with_the_fix():
    class Plain(ToyEvaluator):
        local_errors = None

    with pytest.raises(RuntimeError, match="localscreen needs an evaluator with local_errors"):
        make_engine(Plain()).step()


@pytest.mark.parametrize(("options", "cycles", "message"), [
    ({"screen": 0}, 1, "screen must be an integer >= 1, got 0"),
    ({"candidates": 2.5}, 1, "candidates must be an integer >= 1, got 2.5"),
    ({}, 3, "num_cycles must be 1"),
])
def test_bad_settings_say_what_to_fix(options, cycles, message):
    with pytest.raises(ValueError, match=message):
        LocalScreen(SearchConfig(num_cycles=cycles, strategy_options=options))


def test_a_config_selects_localscreen_through_the_cli(tmp_path, tiny_vit_checkpoint):
    cli = fit_with_strategy(tiny_vit_checkpoint, tmp_path, "localscreen", "{screen: 4, candidates: 2}", num_cycles=1,
                            batch_size=16)
    engine = cli.model.engine
    assert type(engine.state.strategy) is LocalScreen and engine.done
    assert engine.state.evaluations == 1 + 3 * 2
    assert engine.state.current_fitness < engine.state.baseline_fitness
