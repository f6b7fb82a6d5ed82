"""CMA-ES from the ``cma`` package over one block's scales: ``strategy: cmaes``.

Each visit starts a fresh evolution strategy at the block's current scales, in coordinates relative to them (scales
= start * x, x0 = 1), so one step size fits every channel whatever its magnitude. Above ``diagonal_above`` values
the separable (diagonal-covariance) variant runs, whose cost grows linearly with the vector. Each generation asks
``popsize`` candidates; the model holds the best one scored so far (the distribution's mean is never written, as
it was never scored). Budget per visit: ``num_cycles * popsize`` evaluations.

The library draws its normal samples through an option; here that option reads the engine's generator, so every
DDP rank draws the same candidates and a resumed search the same ones as an uninterrupted one. The library object
itself (mean, paths, covariance, step size, counters) is pickled into the state whole.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import cma
import numpy as np
import torch

from evolq_pl.search.evolution import _MIN_SCALE
from evolq_pl.search.schedule import SearchConfig, is_count
from evolq_pl.search.strategies.base import Strategy, keep_improvements


class _EngineNormal:
    """cma's ``randn`` option: standard normal draws from the generator lent for one ``ask``, from nothing else."""

    def __init__(self) -> None:
        self.rng: np.random.Generator | None = None

    def __call__(self, *shape: int) -> np.ndarray:
        if self.rng is None:
            raise RuntimeError("cma drew a random number outside ask(): all randomness must be the engine's")
        return self.rng.standard_normal(shape)


class _Pickler(pickle.Pickler):
    """Pickles a ``CMAEvolutionStrategy`` without its wall-clock timer and file logger, which hold the time of day
    (so one state pickles to the same bytes in every run) and decide nothing."""

    def __init__(self, file: io.BytesIO, es: cma.CMAEvolutionStrategy) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.skip = {id(es.timer): "timer", id(es.logger): "logger"}

    def persistent_id(self, obj: Any) -> str | None:
        return self.skip.get(id(obj))


class _Unpickler(pickle.Unpickler):
    """Loads only what a pickled ``CMAEvolutionStrategy`` holds (cma's own classes, numpy arrays and scalars), so a
    checkpoint cannot name any other callable; gives it a fresh, paused timer and a logger that writes nothing."""

    OTHERS = {("builtins", "range"), ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.multiarray", "scalar"),
              ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
              ("numpy.linalg", "eigh"), (__name__, "_EngineNormal")}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "cma" or (module, name) in self.OTHERS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a cmaes search state may not name {module}.{name}: the checkpoint is not "
                                     "one evolq-pl wrote")

    def persistent_load(self, pid: Any) -> Any:
        if pid == "timer":
            return cma.utilities.utils.ElapsedWCTime().pause()
        if pid == "logger":
            return None  # replaced once the strategy object exists
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a cmaes search state")


def dump_es(es: cma.CMAEvolutionStrategy) -> torch.Tensor:
    """The library object as a uint8 tensor (a checkpoint loads it with ``weights_only``)."""
    buffer = io.BytesIO()
    _Pickler(buffer, es).dump(es)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def load_es(data: torch.Tensor) -> cma.CMAEvolutionStrategy:
    """Inverse of ``dump_es``."""
    es = _Unpickler(io.BytesIO(data.numpy().tobytes())).load()
    es.logger = cma.CMADataLogger(es.opts["verb_filenameprefix"], modulo=0)
    return es


class CMAES(Strategy):
    """CMA-ES (``cma.CMAEvolutionStrategy``) started at the block's scales; the best scored candidate is kept."""

    name = "cmaes"
    options = {"popsize": 5, "sigma": None, "diagonal_above": 100}
    """``popsize``: candidates per generation; ``sigma``: initial step relative to the scales (None: the std of the
    paper's mutation, eps / sqrt(3), over the median |scale|); ``diagonal_above``: vector length from which the
    separable variant runs."""

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        popsize, sigma, diagonal = self.option("popsize"), self.option("sigma"), self.option("diagonal_above")
        if not is_count(popsize, 2):
            raise ValueError(f"cmaes popsize must be an integer >= 2, got {popsize!r}; e.g. strategy_options: "
                             "{popsize: 5}")
        if sigma is not None and not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"cmaes sigma must be a number > 0 (relative to the scales) or null, got {sigma!r}; "
                             "e.g. 0.03")
        if not is_count(diagonal):
            raise ValueError(f"cmaes diagonal_above must be an integer >= 0, got {diagonal!r}")
        self.es: cma.CMAEvolutionStrategy | None = None
        self.start: torch.Tensor | None = None
        self.best_scales: torch.Tensor | None = None
        self.best_fitness = math.inf
        self._asked: list[np.ndarray] = []

    def _es(self) -> cma.CMAEvolutionStrategy:
        if self.es is None:
            raise RuntimeError("the strategy has no visit in progress: call start_visit first")
        return self.es

    def start_visit(self, scales: torch.Tensor, fitness: float, eps: float, rng: np.random.Generator) -> None:
        self.start = scales.detach().to("cpu", torch.float64).clone()
        sigma = self.option("sigma")
        if sigma is None:
            sigma = eps / math.sqrt(3) / float(self.start.abs().median().clamp_min(_MIN_SCALE))
        n = scales.numel()
        opts = {"popsize": self.option("popsize"), "randn": _EngineNormal(), "seed": math.nan,
                "CMA_diagonal": n > self.option("diagonal_above"), "verbose": -9, "verb_log": 0, "verb_disp": 0,
                "tolfun": 0, "tolx": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9, "maxiter": math.inf}
        self.es = cma.CMAEvolutionStrategy(np.ones(n), float(sigma), opts)
        self.best_scales, self.best_fitness = scales.detach().clone(), float(fitness)

    def _to_scales(self, x: np.ndarray) -> torch.Tensor:
        assert self.start is not None and self.best_scales is not None
        child = (self.start * torch.from_numpy(np.asarray(x, dtype=np.float64))).abs().clamp_min(_MIN_SCALE)
        return child.to(device=self.best_scales.device, dtype=self.best_scales.dtype)

    def ask(self, rng: np.random.Generator) -> list[torch.Tensor]:
        es = self._es()
        normal = es.opts["randn"]
        normal.rng = rng
        try:
            self._asked = es.ask()
        finally:
            normal.rng = None
        return [self._to_scales(x) for x in self._asked]

    def tell(self, candidates: list[torch.Tensor], fitnesses: list[float]) -> list[bool]:
        if len(self._asked) != len(candidates):
            raise RuntimeError("tell() needs the candidates of the last ask(), in order")
        finite = [f for f in fitnesses if math.isfinite(f)]
        worst = max(finite, default=self.best_fitness if math.isfinite(self.best_fitness) else 0.0)
        ranked = [f if math.isfinite(f) else worst + abs(worst) + 1.0 for f in fitnesses]  # last in cma's ranking
        self._es().tell(self._asked, ranked)
        self._asked = []
        (self.best_scales, self.best_fitness), kept = keep_improvements((self.best_scales, self.best_fitness),
                                                                        candidates, fitnesses)
        return kept

    def best(self) -> tuple[torch.Tensor, float]:
        self._es()
        assert self.best_scales is not None
        return self.best_scales, self.best_fitness

    def stats(self) -> dict[str, float]:
        return {"sigma": float(self._es().sigma)}

    def state_dict(self) -> dict[str, Any]:
        return {"es": None if self.es is None else dump_es(self.es), "start": _copy(self.start),
                "best_scales": _copy(self.best_scales), "best_fitness": self.best_fitness}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es = None if state["es"] is None else load_es(state["es"])
        self.start, self.best_scales = _copy(state["start"]), _copy(state["best_scales"])
        self.best_fitness = float(state["best_fitness"])
        self._asked = []


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()
