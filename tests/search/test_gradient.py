"""Straight-through gradient steps (``strategy: gradient``): each gradient counted at its cost, steps against it
that lower the fitness, a mutation where the gradient is zero, step sizes that adapt, exact resume, selectable
through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evolq_pl.search.engine import GRADIENT_COST, SearchEngine, same_state
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.search.strategies import get_strategy, strategy_names
from evolq_pl.search.strategies.gradient import GradientSteps
from evolq_pl.testing import ToyEvaluator, fit_with_strategy, interrupt_and_resume, toy_engine
from evolq_pl.testing import run_search as run

OPTIONS = {"steps": [0.03, 0.1], "fraction": 0.5}  # ToyEvaluator: two of its 4 coordinate groups
CONFIG = SearchConfig(num_cycles=2, num_passes=2, eps=2e-2, strategy_options=OPTIONS)
SIZES = (5, 3, 4)


def make_engine(evaluator: ToyEvaluator | None = None, seed: int = 7, num_cycles: int = 2, **options) -> SearchEngine:
    config = SearchConfig(num_cycles=num_cycles, num_passes=2, eps=2e-2, strategy_options={**OPTIONS, **options})
    return toy_engine(config, "gradient", seed, evaluator, SIZES)


def test_registered_and_selected_by_name():
    assert "gradient" in strategy_names() and get_strategy("gradient") is GradientSteps


def test_steps_against_the_gradient_lower_the_fitness_and_each_gradient_counts_at_its_cost():
    engine = make_engine()
    reports = run(engine)
    assert all(len(r.fitnesses) == 2 for r in reports)
    generations = engine.num_visits * CONFIG.num_cycles
    assert engine.state.evaluations == pytest.approx(1 + generations * (GRADIENT_COST * 0.5 + 2))
    assert sum(r.accepted for r in reports) >= 4
    best = [r.best_fitness for r in reports]
    assert all(b <= a for a, b in zip(best, best[1:], strict=False))
    assert engine.evaluator.fitness() == best[-1] < 0.6 * engine.state.baseline_fitness
    assert all(r.stats["fallback"] == 0.0 for r in reports)


def test_a_zero_gradient_falls_back_to_the_papers_mutation():
    evaluator = ToyEvaluator()
    evaluator.targets = [torch.ones_like(t) for t in evaluator.targets]  # the scales start at the optimum
    engine = make_engine(evaluator)
    report = engine.step()
    assert len(report.fitnesses) == 1 and report.stats["fallback"] == 1.0 and report.accepted == 0
    assert torch.equal(evaluator.get(engine.schedule[0]), torch.ones(SIZES[engine.schedule[0]]))


def _log_step(candidate: torch.Tensor, best: torch.Tensor) -> float:
    """The root-mean-square change of the log scales from ``best`` to ``candidate``."""
    return float((candidate.double() / best.double()).log().pow(2).mean().sqrt())


def test_adapted_sizes_double_when_the_largest_step_is_kept_and_shrink_when_none_is():
    strategy = GradientSteps(SearchConfig(strategy_options={"steps": [0.03, 0.1], "adapt": True}))
    best = torch.linspace(0.5, 1.5, 6)
    strategy.gradient = lambda scales, fraction: torch.linspace(-1, 2, 6)
    strategy.start_visit(best, 1.0, 0.01, None)
    small, large = strategy.ask(None)
    assert (_log_step(small, best), _log_step(large, best)) == pytest.approx((0.03, 0.1))
    assert strategy.tell([small, large], [0.9, 0.8]) == [False, True] and strategy.factor == 2.0
    assert strategy.tell([small, large], [0.5, 0.7]) == [True, False] and strategy.factor == 2.0
    strategy.start_visit(best, 0.1, 0.01, None)  # the factor carries into the next visit
    assert [_log_step(c, best) for c in strategy.ask(None)] == pytest.approx([0.06, 0.2])
    assert strategy.tell(strategy.ask(None), [0.2, 0.3]) == [False, False] and strategy.factor == pytest.approx(2 / 3)
    for _ in range(6):  # 2/3 / 3**6 < 1e-3
        strategy.tell([small, large], [0.2, 0.3])
    assert strategy.factor == 1.0  # below a thousandth: back to the configured sizes
    plain = GradientSteps(SearchConfig(strategy_options={"steps": [0.03, 0.1]}))
    plain.start_visit(best, 1.0, 0.01, None)
    plain.tell([small, large], [2.0, 2.0])
    assert plain.factor == 1.0  # without adapt the sizes stay as configured


def test_mutants_are_scored_beside_the_steps_and_count_one_evaluation_each():
    """The paper's mutations of the best scales join every generation's candidates (and a fallback's); a kept
    mutant leaves the steps failed, so the adapted sizes shrink all the same."""
    engine = make_engine(mutants=2, adapt=True)
    reports = run(engine)
    assert all(len(r.fitnesses) == 4 for r in reports)
    generations = engine.num_visits * CONFIG.num_cycles
    assert engine.state.evaluations == pytest.approx(1 + generations * (GRADIENT_COST * 0.5 + 2 + 2))
    strategy = GradientSteps(SearchConfig(eps=0.01, relative_mutation=True,
                                          strategy_options={"steps": [0.03, 0.1], "adapt": True, "mutants": 2}))
    best = torch.linspace(0.5, 1.5, 6)
    strategy.gradient = lambda scales, fraction: torch.linspace(-1, 2, 6)
    strategy.start_visit(best, 1.0, 0.01, None)
    rng = np.random.default_rng(0)
    candidates = strategy.ask(rng)
    assert len(candidates) == 4
    assert all(0 < float((c / best - 1).abs().max()) <= 0.01 for c in candidates[2:])  # relative, within eps
    assert strategy.tell(candidates, [1.5, 1.2, 0.9, 1.1]) == [False, False, True, False]
    assert strategy.factor == pytest.approx(1 / 3)
    strategy.gradient = lambda scales, fraction: torch.zeros(6)
    assert len(strategy.ask(rng)) == 3 and strategy.fallback  # one fallback mutation and the two mutants


def test_mutation_units_are_searched_by_mutations_alone_without_a_gradient_or_its_cost():
    """The engine tells the strategy which unit it visits; a unit in ``mutation_units`` gets that many mutations
    per generation and no gradient, and its generations leave the adapted sizes alone."""
    engine = make_engine(mutation_units={"1": 3}, adapt=True)
    asked: list[int] = []
    gradient = engine.evaluator.gradient
    engine.evaluator.gradient = lambda block, *args: asked.append(block) or gradient(block, *args)
    factors = {}
    for report in run(engine):
        assert len(report.fitnesses) == (3 if report.block == 1 else 2)
        factors.setdefault(report.visit, []).append(report.stats["step_factor"])
    assert 1 not in asked and set(asked) == {0, 2}
    mutating = engine.num_visits // len(SIZES) * CONFIG.num_cycles  # block 1's generations
    assert engine.state.evaluations == pytest.approx(1 + mutating * 3 + 2 * mutating * (GRADIENT_COST * 0.5 + 2))
    for visit, values in factors.items():  # block 1's visits end with the factor the visit before left
        if engine.schedule[visit] == 1:
            assert set(values) == {factors[visit - 1][-1]}


@pytest.mark.parametrize("units", [{"stem": 2}, {"1": 2, "head": 1}])
def test_mutation_units_naming_no_unit_are_refused_with_the_units_there_are(units):
    with pytest.raises(ValueError, match="mutation_units names (head|stem), .*its units are 0, 1, 2 .*search_stem"):
        make_engine(mutation_units=units)


def test_screened_mutations_take_each_scale_from_the_draw_with_the_lowest_local_error():
    """With ``screen``, each mutation of a unit in ``mutation_units`` picks scale by scale among the current value
    and ``screen`` mutations: never locally worse than the current scales, and no gradient is asked."""
    strategy = GradientSteps(SearchConfig(num_cycles=1, eps=0.05, relative_mutation=True,
                                          strategy_options={"mutation_units": {"stem": 2}, "screen": 8}))
    best = torch.linspace(0.5, 1.5, 6)
    target = best * torch.tensor([1.03, 0.97, 1.03, 0.97, 1.0, 1.02])
    strategy.unit, strategy.gradient = "stem", None
    strategy.local_errors = lambda pool: (torch.stack(pool) - target).abs().double()
    strategy.start_visit(best, 1.0, 0.05, None)
    candidates = strategy.ask(np.random.default_rng(0))
    assert len(candidates) == 2 and not torch.equal(candidates[0], candidates[1])
    for c in candidates:
        assert ((c - target).abs() <= (best - target).abs()).all() and (c - target).abs().sum() < 0.5 * (
            best - target).abs().sum()
    strategy.local_errors = None
    with pytest.raises(RuntimeError, match="gradient screen needs an evaluator with local_errors"):
        strategy.ask(np.random.default_rng(0))


def test_local_grid_scores_one_candidate_per_unit_first_each_scale_at_its_locally_best_multiple():
    """With ``local_grid``, the first generation in each unit scores one candidate, no gradient and one evaluation:
    every scale times the multiple (or 1) with the lowest layer-local error. Later visits of the unit take steps."""
    grid = [0.8, 0.9, 1.1, 1.2]
    engine = make_engine(local_grid=grid, adapt=True)
    evaluator = engine.evaluator
    asked: list[int] = []
    gradient = evaluator.gradient
    evaluator.gradient = lambda block, *args: asked.append(block) or gradient(block, *args)
    multiples = torch.tensor([1.0, *grid])
    asks: list[list[torch.Tensor]] = []
    ask = engine.state.strategy.ask
    engine.state.strategy.ask = lambda rng: asks.append(ask(rng)) or asks[-1]
    reports = []
    while not engine.done:
        block, visit = engine.schedule[engine.next_visit], engine.next_visit
        first = visit < len(SIZES) and engine.state.generation in (0, CONFIG.num_cycles)
        expected = None
        if first:
            current = evaluator.get(block)
            choice = ((current[None] * multiples[:, None] - evaluator.local_targets[block][None]) ** 2).argmin(0)
            expected = current * multiples[choice]
        before = len(asked)
        report = engine.step()
        reports.append(report)
        if first:
            assert len(report.fitnesses) == 1 and len(asked) == before and report.stats["step_factor"] == 1.0
            assert torch.equal(asks[-1][0], expected) and not torch.equal(expected, current)
        else:
            assert len(report.fitnesses) == 2 and asked[-1] == block
    assert sorted(engine.state.strategy.gridded) == ["0", "1", "2"]
    gradients = engine.num_visits * CONFIG.num_cycles - len(SIZES)
    assert engine.state.evaluations == pytest.approx(1 + len(SIZES) + gradients * (GRADIENT_COST * 0.5 + 2))
    assert reports[0].accepted == 1  # the toy's local optimum is near its global one
    strategy = GradientSteps(SearchConfig(strategy_options={"local_grid": grid}))
    strategy.start_visit(torch.ones(3), 1.0, 0.01, None)
    with pytest.raises(RuntimeError, match="local_grid needs an evaluator with local_errors"):
        strategy.ask(np.random.default_rng(0))


@pytest.mark.parametrize(("num_cycles", "options"), [(2, {}), (2, {"adapt": True}),
                                                     (2, {"adapt": True, "mutation_units": {"0": 2}}),
                                                     (1, {"mutation_units": {"0": 2}, "screen": 3}),
                                                     (2, {"local_grid": [0.9, 1.1], "mutation_units": {"1": 2}})])
@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_save_and_restore_continues_exactly(stop_after, num_cycles, options):
    reference, ref_reports, resumed, reports = interrupt_and_resume(
        lambda evaluator=None, seed=7: make_engine(evaluator, seed, num_cycles, **options), stop_after)
    assert [r.fitnesses for r in reports] == [r.fitnesses for r in ref_reports]
    assert all(torch.equal(resumed.evaluator.get(b), reference.evaluator.get(b)) for b in range(len(SIZES)))
    assert same_state(resumed.state_dict(), reference.state_dict())


def test_an_evaluator_without_a_gradient_is_refused_with_the_fix():
    class Plain(ToyEvaluator):
        gradient = None

    with pytest.raises(RuntimeError, match="gradient strategy needs an evaluator with gradient"):
        make_engine(Plain()).step()


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": []}, "steps must be a non-empty list"),
    ({"steps": [0.1, -0.1]}, "steps must be a non-empty list of relative sizes in \\(0, 10\\), got \\[0.1, -0.1\\]"),
    ({"steps": 0.1}, "steps must be a non-empty list"),
    ({"fraction": 0}, "fraction must be in \\(0, 1\\], got 0"),
    ({"momentum": 0.9}, "has no option 'momentum'"),
    ({"adapt": "yes"}, "adapt must be true or false, got 'yes'"),
    ({"mutants": -1}, "mutants must be a whole number >= 0, got -1"),
    ({"mutation_units": ["stem"]}, "mutation_units must map unit names to mutations per generation .* got \\['stem'\\]"),
    ({"mutation_units": {"stem": 0}}, "mutation_units must map unit names to mutations per generation"),
    ({"screen": -1}, "screen must be a whole number >= 0, got -1"),
    ({"screen": 4}, "give mutation_units too"),
    ({"screen": 4, "mutation_units": {"stem": 1}}, "num_cycles must be 1, got 3"),
    ({"local_grid": 0.9}, "local_grid must be a list of multiples of a scale in \\(0, 10\\), got 0.9"),
    ({"local_grid": [0.9, 0]}, "local_grid must be a list of multiples"),
    ({"local_grid": [True]}, "local_grid must be a list of multiples"),
])
def test_bad_settings_say_what_to_fix(options, message):
    with pytest.raises(ValueError, match=message):
        GradientSteps(SearchConfig(strategy_options=options))


def test_a_config_selects_gradient_through_the_cli(tmp_path, tiny_vit_checkpoint):
    cli = fit_with_strategy(tiny_vit_checkpoint, tmp_path, "gradient", "{steps: [0.03, 0.1]}", num_cycles=1,
                            batch_size=16)
    engine = cli.model.engine
    assert type(engine.state.strategy) is GradientSteps and engine.done
    assert engine.state.evaluations == 1 + 3 * (GRADIENT_COST + 2)
    assert engine.state.current_fitness < engine.state.baseline_fitness
