"""Straight-through gradient steps: ``strategy: gradient``.

The fitness is a step function of the scales (every weight is rounded), so its gradient is zero wherever it
exists. Through straight-through rounding, with the float op standing in for each integer one
(``functional.straight_through``), it still gives a direction: the one weight-scale learning (LSQ) descends. Here
it only proposes. Each generation takes that gradient at the visit's best scales, in log-scale (a relative change
per scale), normalises it to a root-mean-square of 1, and proposes one step of each relative size in ``steps``
against it. Each step is scored on the full calibration set, and the best is kept only when it beats the best so
far, as every strategy keeps. A zero or non-finite gradient falls back to the paper's mutation, with the block's
eps.

With ``adapt``, the sizes carry a factor across generations and visits, as a line search's trust region: doubled
when the largest step was kept, divided by 3 when none was, and back to 1 once below a thousandth. A unit searched
many times (``search_jointly``: every layer in one unit) then keeps finding steps where fixed sizes stall.

With ``mutants``, each generation also scores that many of the paper's mutations of the best scales (with the
block's eps, relative with ``relative_mutation``), for units whose fitness no gradient step lowers: a stem, whose
landscape is too jagged at every step size measured. With ``mutation_units`` (e.g. ``{stem: 4}``), the units named
there are searched by that many mutations per generation alone, without a gradient (nor its cost): the stem gets
what lowers its fitness, the rest of the model the steps (benchmarks/RESULTS.md, "LeViT's stem"). With ``screen``,
each of those mutations becomes ``localscreen``'s recombination of that many: per scale, the value with the lowest
layer-local error (a convolution's output channel against its FP weight's, on its calibration inputs). On LeViT's
stem it did not help (benchmarks/RESULTS.md, "Round 5"): it stays for research, not in a pick.

With ``local_grid`` (multiples of a scale, e.g. 0.5 to 1.2), the first generation in each unit scores one candidate
only: every scale times the multiple in that list with the lowest layer-local error (``localscreen.grid_start``).
The global fitness decides, as for every candidate. It costs one evaluation per unit and lands where no small step
reaches: on LeViT's stem at W3A8 it lowered the calibration KL from 0.074 to 0.024 (benchmarks/RESULTS.md, "Round
6").

Cost: the engine counts a gradient on a share f of the calibration set as ``GRADIENT_COST * f`` evaluations
(``search/engine.py``), so a generation with a full-set gradient and 2 steps costs 6. At ``num_passes: 5`` and
``num_cycles: 1`` that is the paper's 3 evaluations per visit at 10 passes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from evolq_pl.search.evolution import mutate
from evolq_pl.search.schedule import SearchConfig, is_count, is_share
from evolq_pl.search.strategies.base import KeepsBest
from evolq_pl.search.strategies.localscreen import grid_start, screened_mutation


def _relative_sizes(values: object) -> bool:
    """Whether a setting is a list of numbers in (0, 10): step sizes, or multiples of a scale (a bool is none)."""
    return isinstance(values, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 10 for v in values)


class GradientSteps(KeepsBest):
    """Steps of a few relative sizes against the straight-through gradient of the fitness; keep the best."""

    name = "gradient"
    options = {"steps": [0.03, 0.1], "fraction": 1.0, "adapt": False, "mutants": 0, "mutation_units": {},
               "screen": 0, "local_grid": []}
    """``steps``: the relative sizes tried per generation (root-mean-square change of the log scales);
    ``fraction``: the share of the calibration batches the gradient is taken on; ``adapt``: scale the sizes by
    what the last generations kept; ``mutants``: mutations scored beside the steps in each generation;
    ``mutation_units``: unit name -> mutations per generation, for units searched by mutations alone; ``screen``:
    mutations each of those picks from per scale by layer-local error (0: plain mutations); ``local_grid``: the
    multiples of each scale the first generation in a unit picks from by layer-local error ([]: none)."""

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        steps, fraction = self.option("steps"), self.option("fraction")
        if not steps or not _relative_sizes(steps):
            raise ValueError(f"gradient steps must be a non-empty list of relative sizes in (0, 10), got {steps!r}; "
                             "e.g. [0.03, 0.1]")
        if not is_share(fraction):
            raise ValueError(f"gradient fraction must be in (0, 1], got {fraction!r}; e.g. 1.0 (every batch)")
        mutants = self.option("mutants")
        if not is_count(mutants):
            raise ValueError(f"gradient mutants must be a whole number >= 0, got {mutants!r}; e.g. 2")
        units = self.option("mutation_units")
        if not isinstance(units, dict) or not all(isinstance(k, str) and is_count(n, 1) for k, n in units.items()):
            raise ValueError(f"gradient mutation_units must map unit names to mutations per generation (whole "
                             f"numbers >= 1), got {units!r}; e.g. {{stem: 4}}")
        screen = self.option("screen")
        if not is_count(screen):
            raise ValueError(f"gradient screen must be a whole number >= 0, got {screen!r}; e.g. 16")
        if screen and not units:
            raise ValueError("gradient screen recombines the mutations of the units in mutation_units, and there "
                             "are none: give mutation_units too, e.g. {stem: 4}")
        if screen and config.num_cycles != 1:
            raise ValueError(f"gradient screen reads the layers' inputs once per visit, so num_cycles must be 1, "
                             f"got {config.num_cycles}")
        grid = self.option("local_grid")
        if not _relative_sizes(grid):
            raise ValueError(f"gradient local_grid must be a list of multiples of a scale in (0, 10), got {grid!r}; "
                             "e.g. [0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2]")
        if not isinstance(self.option("adapt"), bool):
            raise ValueError(f"gradient adapt must be true or false, got {self.option('adapt')!r}")
        self.fallback = False
        """Whether the last ``ask`` fell back to a mutation (the gradient was zero or not finite)."""
        self.factor = 1.0
        """What the sizes in ``steps`` are multiplied by (``adapt``; 1 otherwise): kept across visits."""
        self.gridded: list[str] = []
        """The units whose ``local_grid`` candidate has been scored (once each, in their first generation)."""
        self.gridding = False
        """Whether the last ``ask`` was a unit's ``local_grid`` candidate."""

    def check_units(self, names: list[str]) -> None:
        unknown = sorted(set(self.option("mutation_units")) - set(names))
        if unknown:
            raise ValueError(f"gradient mutation_units names {', '.join(unknown)}, which the search has no unit "
                             f"of: its units are {', '.join(names)} (the stem is one with search_stem=true)")

    def _mutating(self) -> bool:
        """Whether the unit being visited is searched by mutations alone (``mutation_units``)."""
        return self.unit in self.option("mutation_units")

    def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
        best = self._best()
        self.gridding = bool(self.option("local_grid")) and str(self.unit) not in self.gridded
        if self.gridding:
            self.fallback = False
            return [grid_start(best, list(self.option("local_grid")), self.require_local_errors("gradient local_grid"))]
        if self._mutating():
            self.fallback = False
            count, screen, relative = (self.option("mutation_units")[self.unit], self.option("screen"),
                                       self.config.relative_mutation)
            if not screen:
                return [mutate(best, self.eps, rng, relative) for _ in range(count)]
            local_errors = self.require_local_errors("gradient screen")
            return [screened_mutation(best, screen, self.eps, relative, rng, local_errors) for _ in range(count)]
        if self.gradient is None:
            raise RuntimeError("the gradient strategy needs an evaluator with gradient (SuffixEvaluator has it)")
        direction = self.gradient(best, float(self.option("fraction"))).double() * best.double()  # d fitness / d log s
        rms = float(direction.pow(2).mean().sqrt())
        self.fallback = not (math.isfinite(rms) and rms > 0)
        count = self.option("mutants") + self.fallback  # a fallback mutation stands in for the steps
        mutants = [mutate(best, self.eps, rng, self.config.relative_mutation) for _ in range(count)]
        if self.fallback:
            return mutants
        unit = direction / rms
        return [*((best.double() * torch.exp(-self.factor * step * unit)).to(best.dtype)
                  for step in self.option("steps")), *mutants]

    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        kept = self.keep(candidates, fitnesses)
        if self.gridding:
            self.gridded.append(str(self.unit))
            return kept
        if self.option("adapt") and not (self.fallback or self._mutating()):
            steps = list(self.option("steps"))
            if kept[steps.index(max(steps))]:
                self.factor *= 2.0
            elif not any(kept[:len(steps)]):  # the steps failed (a mutant may still have been kept)
                self.factor /= 3.0
                if self.factor < 1e-3:
                    self.factor = 1.0
        return kept

    def stats(self) -> dict[str, float]:
        return {"fallback": float(self.fallback), "step_factor": self.factor}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fallback": self.fallback, "factor": self.factor,
                "gridded": list(self.gridded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fallback = bool(state["fallback"])
        self.factor = float(state.get("factor", 1.0))  # checkpoints from before adapt have none
        self.gridded = list(state.get("gridded", []))  # nor from before local_grid
