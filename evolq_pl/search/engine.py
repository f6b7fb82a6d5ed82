"""The Evol-Q search as a thing of its own: block schedule, counters, strategy, random generator and snapshots.

It knows nothing of Lightning or timm. A caller implements :class:`Evaluator` (how to score and write one block's
scale vector) and calls :meth:`SearchEngine.step` once per generation; everything a resume needs is one
:class:`SearchState`, saved and restored whole by ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch

from evolq_pl.search.schedule import SearchConfig, block_schedule
from evolq_pl.search.strategies import Strategy, get_strategy


def same_state(a: Any, b: Any) -> bool:
    """Bitwise equality of two ``state_dict()`` values (nested dicts, lists, tensors, plain values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same_state, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


class Evaluator(Protocol):
    """What the engine needs from a model: score, write and read the scale vector of search block ``block``."""

    def start_block(self, block: int) -> None:
        """A visit of ``block`` begins: prepare to score it (e.g. cache its inputs)."""

    def end_block(self, block: int) -> None:
        """The visit of ``block`` is over: free what ``start_block`` prepared."""

    def evaluate(self, block: int, scales: torch.Tensor) -> float:
        """Write ``scales`` into ``block`` and return the model's fitness (lower is better), over all processes."""

    def apply(self, block: int, scales: torch.Tensor) -> None:
        """Write ``scales`` into ``block``."""

    def get(self, block: int) -> torch.Tensor:
        """A copy of ``block``'s current scales, flattened."""


class BatchEvaluator(Evaluator, Protocol):
    """An evaluator that also scores several candidates together, optionally on a share of the calibration set."""

    def evaluate_many(self, block: int, candidates: Sequence[torch.Tensor], fraction: float = 1.0) -> list[float]:
        """The fitness of each candidate for ``block`` (as ``evaluate`` would give it), on ``calibration_share
        (fraction)`` of the calibration set; the model holds one of them afterwards."""

    def calibration_share(self, fraction: float) -> float:
        """The share of the calibration set that ``evaluate_many(..., fraction)`` actually scores on."""

    def local_errors(self, block: int, candidates: Sequence[torch.Tensor]) -> torch.Tensor:
        """Optional: each candidate's block-local error per scale, ``(len(candidates), numel)``, lower is better;
        cheap, and not a fitness evaluation (the engine hands it to the strategy as ``local_errors``)."""

    def gradient(self, block: int, scales: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
        """Optional: the gradient of the fitness at ``scales`` on ``calibration_share(fraction)`` of the calibration
        set, through straight-through roundings (the engine hands it to the strategy as ``gradient``)."""


GRADIENT_COST = 4
"""Full-set evaluations a gradient on the full calibration set counts as: a forward with autograd and a backward
took 3.97 (the 12-block ViT) and 3.45 (LeViT) times an evaluation over a pass, on one CPU thread
(``benchmarks/gradient_cost.py``; benchmarks/RESULTS.md, "Straight-through gradient steps")."""


class NonFiniteBaseline(RuntimeError):
    """The model's fitness before the search is not finite, so no candidate could ever be compared with it."""

    def __init__(self, fitness: float) -> None:
        super().__init__(f"the starting model's fitness is {fitness}, so no candidate can be compared with it")
        self.fitness = fitness


@dataclass
class SearchState:
    """Everything a resumed search needs besides the model's scales; ``state_dict()`` covers every field."""

    rng: np.random.Generator
    strategy: Strategy
    visit: int = -1
    """Index into the schedule of the visit in progress (or the last one finished); -1 before the first."""
    generation: int = 0
    """Generations done in that visit."""
    evaluations: float = 0
    """Fitness evaluations so far (candidates and the one baseline), in full-calibration-set equivalents (one scored
    on a share f of the calibration set counts f): strategies compare at equal counts."""
    current_fitness: float | None = None
    baseline_fitness: float | None = None
    visit_start_fitness: float | None = None
    visit_start_scales: torch.Tensor | None = None
    baseline_snapshot: list[torch.Tensor] | None = None
    """Every block's scales before the search (the calibrated baseline)."""
    best_heldout: float = -math.inf
    best_snapshot: list[torch.Tensor] | None = None
    """Every block's scales when the held-out score was best (``offer_heldout``)."""

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.random.Generator):
                out[f.name] = copy.deepcopy(value.bit_generator.state)
            elif isinstance(value, Strategy):
                out[f.name] = value.state_dict()
            else:
                out[f.name] = copy.deepcopy(value)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [f.name for f in fields(self) if f.name not in state]
        if missing:
            raise ValueError(f"the search state lacks {missing}: it was written by another version of evolq-pl")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.random.Generator):
                value.bit_generator.state = copy.deepcopy(state[f.name])
            elif isinstance(value, Strategy):
                value.load_state_dict(state[f.name])
            else:
                setattr(self, f.name, copy.deepcopy(state[f.name]))


@dataclass(frozen=True)
class VisitSummary:
    """How one finished block visit changed the model."""

    block: int
    fitness_before: float
    fitness_after: float
    rel_scale_change: float
    """Mean over the block's scales of |after - before| / |before|."""


@dataclass(frozen=True)
class Generation:
    """What one :meth:`SearchEngine.step` did."""

    visit: int
    block: int
    pass_index: int
    index: int
    """Generations done in this visit, this one included."""
    fitnesses: list[float]
    """The candidates' fitness as evaluated (non-finite ones were told to the strategy as inf)."""
    accepted: int
    """Candidates with a finite fitness that the strategy kept."""
    best_fitness: float
    evaluations: float
    """Fitness evaluations of the whole search so far (full-calibration-set equivalents)."""
    seconds: float
    """Wall time of the generation (asking, scoring, telling), without preparing a visit."""
    stats: dict[str, float] = field(default_factory=dict)
    visit_summary: VisitSummary | None = None
    """Set on the last generation of a visit."""


class SearchEngine:
    """Runs the schedule: blocks last to first, ``num_passes`` times, ``num_cycles`` generations per visit."""

    def __init__(self, num_blocks: int, eps: Sequence[float], config: SearchConfig, strategy: str = "evolq",
                 seed: int = 0, evaluator: Evaluator | None = None, names: Sequence[str] | None = None) -> None:
        if len(eps) != num_blocks:
            raise ValueError(f"need one mutation eps per block: {len(eps)} for {num_blocks} blocks")
        self.names = [str(i) for i in range(num_blocks)] if names is None else list(names)
        """Each block's unit name (``SearchBlock.name``), told to the strategy as ``Strategy.unit``."""
        if len(self.names) != num_blocks or len(set(self.names)) != num_blocks:
            raise ValueError(f"need one distinct name per block: {self.names} for {num_blocks} blocks")
        self.config = config
        self.schedule = block_schedule(num_blocks, config.num_passes)
        self.eps = [float(e) for e in eps]
        self.evaluator = evaluator
        self.state = SearchState(rng=np.random.default_rng(seed), strategy=get_strategy(strategy)(config))
        self.state.strategy.check_units(self.names)
        self._prepared: int | None = None  # the visit the evaluator is prepared for (not state: a resume redoes it)

    # -- where the search stands -----------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.eps)

    @property
    def num_visits(self) -> int:
        return len(self.schedule)

    @property
    def next_visit(self) -> int:
        """The visit the next ``step()`` runs in (``num_visits`` when the search is done)."""
        s = self.state
        return s.visit + 1 if s.visit < 0 or s.generation >= self.config.num_cycles else s.visit

    @property
    def done(self) -> bool:
        return self.next_visit >= self.num_visits

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
        self._prepared = None

    # -- the search ------------------------------------------------------------------------------------------------

    def _evaluator(self) -> Evaluator:
        if self.evaluator is None:
            raise RuntimeError("the search engine has no evaluator: set engine.evaluator before stepping")
        return self.evaluator

    def _score(self, block: int, scales: torch.Tensor) -> float:
        self.state.evaluations += 1
        return float(self._evaluator().evaluate(block, scales))

    def _score_all(self, block: int, candidates: list[torch.Tensor], fraction: float) -> list[float]:
        """Score one generation's candidates: one by one, or together where the evaluator can (``evaluate_many``)."""
        evaluator = self._evaluator()
        many = getattr(evaluator, "evaluate_many", None)
        if fraction == 1.0 and (len(candidates) == 1 or many is None):
            return [self._score(block, c) for c in candidates]
        if many is None:
            raise RuntimeError(f"the strategy scores candidates on {fraction:.0%} of the calibration set, which "
                               f"{type(evaluator).__name__} cannot: give it evaluate_many (see BatchEvaluator)")
        share = evaluator.calibration_share(fraction)
        self.state.evaluations += len(candidates) if share == 1.0 else share * len(candidates)
        return [float(f) for f in many(block, candidates, fraction)]

    def _gradient(self, block: int, scales: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
        """The evaluator's gradient, counted as ``GRADIENT_COST`` evaluations per full calibration set."""
        evaluator = self._evaluator()
        self.state.evaluations += GRADIENT_COST * evaluator.calibration_share(fraction)
        return evaluator.gradient(block, scales, fraction)

    def _begin_visit(self, visit: int) -> None:
        s, evaluator, block = self.state, self._evaluator(), self.schedule[visit]
        evaluator.start_block(block)
        self._prepared = visit
        scales = evaluator.get(block)
        if s.current_fitness is None:  # the only full evaluation of an unchanged model
            fitness = self._score(block, scales)
            if not math.isfinite(fitness):  # every candidate would tie with it, and the scales drift unselected
                raise NonFiniteBaseline(fitness)
            s.current_fitness = s.baseline_fitness = fitness
            s.baseline_snapshot = self.snapshot()
        s.visit, s.generation = visit, 0
        s.visit_start_fitness, s.visit_start_scales = s.current_fitness, scales.clone()
        s.strategy.start_visit(scales, s.current_fitness, self.eps[block], s.rng)

    def step(self) -> Generation:
        """Run one generation, starting the next block visit first where the last one is finished."""
        if self.done:
            raise RuntimeError(f"the search is finished: all {self.num_visits} block visits are done")
        s, evaluator = self.state, self._evaluator()
        s.strategy.unit = self.names[self.schedule[self.next_visit]]
        if self.next_visit != s.visit:
            self._begin_visit(self.next_visit)
        elif self._prepared != s.visit:  # resumed inside a visit: strategy, rng and counters came from state
            evaluator.start_block(self.schedule[s.visit])
            self._prepared = s.visit
        block = self.schedule[s.visit]
        started = time.perf_counter()
        local = getattr(evaluator, "local_errors", None)
        s.strategy.local_errors = None if local is None else functools.partial(local, block)
        s.strategy.gradient = None if getattr(evaluator, "gradient", None) is None else functools.partial(
            self._gradient, block)
        candidates = s.strategy.ask(s.rng)
        fitnesses = self._score_all(block, candidates, s.strategy.fidelity())
        kept = s.strategy.tell(candidates, fitnesses)
        scales, best = s.strategy.best()
        evaluator.apply(block, scales)  # the model always holds the best scales so far
        s.current_fitness = best
        s.generation += 1
        seconds = time.perf_counter() - started
        summary = None
        if s.generation == self.config.num_cycles:
            summary = VisitSummary(block, s.visit_start_fitness, best, float(
                ((scales - s.visit_start_scales).abs() / s.visit_start_scales.abs()).mean()))
            evaluator.end_block(block)
            self._prepared = None
        return Generation(s.visit, block, s.visit // self.num_blocks, s.generation, fitnesses,
                          sum(k and math.isfinite(f) for k, f in zip(kept, fitnesses, strict=True)), best,
                          s.evaluations, seconds, s.strategy.stats(), summary)

    # -- whole-model snapshots: the baseline, held-out selection ---------------------------------------------------

    def snapshot(self) -> list[torch.Tensor]:
        """Every block's current scales."""
        return [self._evaluator().get(b) for b in range(self.num_blocks)]

    def restore(self, snapshot: Sequence[torch.Tensor]) -> None:
        """Write a ``snapshot()`` back into the model."""
        for block, scales in enumerate(snapshot):
            self._evaluator().apply(block, scales)

    @contextmanager
    def applied(self, snapshot: Sequence[torch.Tensor]) -> Iterator[None]:
        """Hold ``snapshot`` in the model for a block of code, then put the current scales back."""
        current = self.snapshot()
        self.restore(snapshot)
        try:
            yield
        finally:
            self.restore(current)

    @contextmanager
    def at_baseline(self) -> Iterator[None]:
        """Hold the calibrated scales from before the search, e.g. to evaluate the baseline in-process."""
        if self.state.baseline_snapshot is None:
            raise RuntimeError("no baseline recorded: the search has not started")
        with self.applied(self.state.baseline_snapshot):
            yield

    def offer_heldout(self, score: float) -> bool:
        """Keep a snapshot of the model if ``score`` (higher is better) beats every score offered before."""
        if score > self.state.best_heldout:
            self.state.best_heldout, self.state.best_snapshot = float(score), self.snapshot()
            return True
        return False
