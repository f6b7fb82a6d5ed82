"""The interface every search strategy implements, and the registry that finds one by name."""

from __future__ import annotations

import importlib
import math
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from evolq_pl.search.schedule import SearchConfig

_REGISTRY: dict[str, type[Strategy]] = {}


class Strategy(ABC):
    """Searches one block's scale vector per visit: ``ask`` for candidates, ``tell`` their fitness (lower is better).

    The engine starts each visit with the block's current scales and their fitness, asks, scores every candidate
    (a candidate that cannot be scored is told as ``inf``), tells, and writes ``best()`` into the model. All
    randomness comes from the engine's generator, passed in; everything else a resume needs is in ``state_dict()``.
    """

    name: ClassVar[str] = ""
    """The registry name (``strategy: <name>`` in a config); subclasses without one are not selectable."""
    options: ClassVar[dict[str, Any]] = {}
    """The ``strategy_options`` this strategy understands, with their defaults."""
    local_errors: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    """Set by the engine before each ``ask`` where the evaluator offers it: candidates -> their per-scale block-local
    error (``BatchEvaluator.local_errors`` for the block being visited). Not state: the engine sets it again."""
    gradient: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    """Set by the engine before each ``ask`` where the evaluator offers it: (scales, fraction) -> the straight-through
    gradient of the fitness at ``scales`` on that share of the calibration set (``BatchEvaluator.gradient``), which
    the engine counts as ``GRADIENT_COST`` evaluations per full set. Not state: the engine sets it again."""
    unit: str | None = None
    """The name of the unit being visited (``SearchBlock.name``, e.g. ``stem``), set by the engine before
    ``start_visit`` and each ``ask``, for options that treat units differently. Not state: the engine sets it again."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            known = _REGISTRY.setdefault(cls.name, cls)
            if known is not cls:
                raise ValueError(f"two search strategies are named {cls.name!r}: {known.__module__}, {cls.__module__}")

    def __init__(self, config: SearchConfig) -> None:
        self.config = config
        unknown = sorted(set(config.strategy_options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"strategy {self.name!r} has no option {', '.join(map(repr, unknown))}: "
                             f"it understands {known}")

    def check_units(self, names: list[str]) -> None:
        """Refuse options that name a unit the search does not have; ``names``: every unit, in block order."""
        return None  # most strategies treat every unit alike

    def require_local_errors(self, what: str) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """``local_errors``, or a one-line refusal naming ``what`` (the strategy or option) that needs them."""
        if self.local_errors is None:
            raise RuntimeError(f"{what} needs an evaluator with local_errors (SuffixEvaluator has it)")
        return self.local_errors

    def option(self, key: str) -> Any:
        """A ``strategy_options`` value, or its default from ``options``."""
        return self.config.strategy_options.get(key, self.options[key])

    @abstractmethod
    def start_visit(self, scales: torch.Tensor, fitness: float, eps: float, rng: np.random.Generator) -> None:
        """Begin a visit from ``scales`` (already scored: ``fitness``) with mutation half-width ``eps``."""

    @abstractmethod
    def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
        """The candidates of one generation (one or many scale vectors)."""

    def fidelity(self) -> float:
        """The share of the calibration set the last ``ask``'s candidates are scored on (1: all of it).

        The engine counts a candidate scored on a share ``f`` as ``f`` evaluations, so budgets stay comparable.
        """
        return 1.0

    @abstractmethod
    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        """Take the fitness of each asked candidate; returns whether each was kept (``search/accepted``)."""

    @abstractmethod
    def best(self) -> tuple[torch.Tensor, float]:
        """The best scales of this visit so far and their fitness: what the model holds between generations."""

    def stats(self) -> dict[str, float]:
        """Extra per-generation numbers worth logging (as ``search/<key>``)."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the visit exactly (the generator's state is the engine's)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``."""


def keep_improvements(best: tuple[torch.Tensor | None, float], candidates: list[torch.Tensor],
                      fitnesses: list[float]) -> tuple[tuple[torch.Tensor | None, float], list[bool]]:
    """The best of ``best`` and the finite-fitness candidates (the earlier wins a tie), and which candidate it is."""
    kept = [False] * len(candidates)
    for i, (c, f) in enumerate(zip(candidates, fitnesses, strict=True)):
        if math.isfinite(f) and f < best[1]:
            best = (c.detach().clone(), float(f))
            kept = [False] * len(candidates)
            kept[i] = True
    return best, kept


class KeepsBest(Strategy, ABC):
    """A strategy that proposes around the block's best scales of the visit and keeps a candidate only when its
    full-set fitness beats them: the state such strategies share (the best so far and the visit's eps)."""

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        self.best_scales: torch.Tensor | None = None
        self.best_fitness = math.inf
        self.eps: float | None = None

    def start_visit(self, scales: torch.Tensor, fitness: float, eps: float, rng: np.random.Generator) -> None:
        self.best_scales, self.best_fitness, self.eps = scales.detach().clone(), float(fitness), eps

    def _best(self) -> torch.Tensor:
        if self.best_scales is None:
            raise RuntimeError("the strategy has no visit in progress: call start_visit first")
        return self.best_scales

    def keep(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        """Take the best finite candidate that beats the best so far; which one was kept."""
        (self.best_scales, self.best_fitness), kept = keep_improvements((self.best_scales, self.best_fitness),
                                                                        candidates, fitnesses)
        return kept

    def best(self) -> tuple[torch.Tensor, float]:
        return self._best(), self.best_fitness

    def state_dict(self) -> dict[str, Any]:
        return {"best_scales": None if self.best_scales is None else self.best_scales.clone(),
                "best_fitness": self.best_fitness, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state["best_scales"]
        self.best_scales = None if best is None else best.clone()
        self.best_fitness, self.eps = float(state["best_fitness"]), state["eps"]


def _discover() -> None:
    """Import every module of this package, so that each strategy file registers its class."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def strategy_names() -> list[str]:
    """The names a config may give as ``strategy``."""
    _discover()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown search strategy {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
