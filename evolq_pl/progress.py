"""The console progress bar of a search: one bar for the whole search, its place in it, and the time it has left.

Lightning's bar counts the batches of one epoch, here one block visit of a few generations, and its remaining time
is the epoch's. :class:`SearchProgressBar` (cli.py's default) counts the generations of the whole search instead, a
resumed search starting from those its checkpoint had done, and shows block, pass, generation in the visit, the best
calibration fitness and :class:`SearchClock`'s estimate of what is left.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Sequence
from statistics import fmean
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from evolq_pl.callbacks import generation_of
from evolq_pl.search.engine import Generation, SearchEngine


class SearchClock:
    """Estimates the seconds a search has left from the generations timed so far (in this process).

    A generation's cost depends on its block: a candidate runs the network only from that block on, so blocks near
    the input cost the most. A block that has been timed counts at its mean; until then, at a line fitted through
    (blocks from it to the output, seconds) of the timed blocks (proportional to that count while one block is timed).
    What the generations' own timers leave out (preparing a visit, held-out validation, checkpoints, logs) enters as
    the ratio of wall time to timed time since the clock started.
    """

    def __init__(self, num_blocks: int, remaining: Sequence[int]) -> None:
        self.num_blocks = num_blocks
        self.remaining = deque(remaining)
        """The block of each generation still to run, in order."""
        self.seconds: dict[int, list[float]] = {}
        self.timed = 0.0

    def tick(self, block: int, seconds: float) -> None:
        """One generation of ``block`` ran, its own timer says in ``seconds``."""
        if self.remaining:
            self.remaining.popleft()
        self.seconds.setdefault(block, []).append(seconds)
        self.timed += seconds

    def block_seconds(self, block: int) -> float:
        """The expected seconds of one generation of ``block`` (needs one timed generation)."""
        if block in self.seconds:
            return fmean(self.seconds[block])
        suffix = np.array([self.num_blocks - b for b in self.seconds], dtype=float)
        mean = np.array([fmean(v) for v in self.seconds.values()])
        if len(suffix) >= 2:
            slope, intercept = np.polyfit(suffix, mean, 1)
            if slope > 0 and intercept >= 0:
                return float(intercept + slope * (self.num_blocks - block))
        return float(mean.sum() / suffix.sum() * (self.num_blocks - block))

    def eta(self, wall_seconds: float) -> float | None:
        """Seconds left, given the wall time since the clock started; None before the first timed generation."""
        if not self.remaining:
            return 0.0
        if not self.seconds:
            return None
        overhead = max(1.0, wall_seconds / self.timed) if self.timed > 0 else 1.0
        per_block = {b: self.block_seconds(b) for b in set(self.remaining)}
        return overhead * sum(per_block[b] for b in self.remaining)


def search_plan(engine: SearchEngine, max_epochs: int) -> tuple[int, list[int]]:
    """(generations done, the block of each generation still to run) for a fit of ``max_epochs`` visits."""
    cycles, state = engine.config.num_cycles, engine.state
    visits = min(max_epochs, engine.num_visits)
    left = [cycles - (state.generation if v == state.visit else 0) for v in range(engine.next_visit, visits)]
    done = visits * cycles - sum(left)
    return done, [engine.schedule[v] for v, n in zip(range(engine.next_visit, visits), left, strict=True)
                  for _ in range(n)]


class SearchProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with one bar for the whole search instead of one per epoch (block visit).

    Shows ``n/total generations``, the wall time so far, and ``block``, ``pass`` (of all), ``gen`` (of the visit),
    ``best`` (the best calibration fitness) and ``ETA`` (the whole search's, :class:`SearchClock`). Validation and
    test bars, and a module without a search engine, are Lightning's as they are.
    """

    BAR_FORMAT_SEARCH = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} generations [{elapsed}{postfix}]"
    """tqdm's own remaining time is left out: the generations of a search cost more towards the first block."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self.clock: SearchClock | None = None
        self.last: Generation | None = None
        self._started = 0.0

    @staticmethod
    def _engine(pl_module: LightningModule) -> SearchEngine | None:
        engine = getattr(pl_module, "engine", None)
        return engine if isinstance(engine, SearchEngine) else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engine = self._engine(pl_module)
        if engine is None or trainer.max_epochs is None:
            self.clock = None
            super().on_train_start(trainer, pl_module)
            return
        done, remaining = search_plan(engine, trainer.max_epochs)
        self.clock, self.last, self._started = SearchClock(engine.num_blocks, remaining), None, time.perf_counter()
        postfix = self.get_metrics(trainer, pl_module)  # as text: a dict would be shown with its keys sorted
        self.train_progress_bar = Tqdm(  # Lightning's training bar, over the whole search
            desc="Search", total=done + len(remaining), initial=done, position=2 * self.process_position,
            disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
            bar_format=self.BAR_FORMAT_SEARCH,
            postfix=", ".join(f"{k}={v if isinstance(v, str) else Tqdm.format_num(v)}" for k, v in postfix.items()))

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if self.clock is None:
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.clock is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        report = generation_of(outputs)
        if report is None:
            return  # a tick replayed after a resume: no generation ran
        self.clock.tick(report.block, report.seconds)
        self.last = report
        bar = self.train_progress_bar
        bar.n = bar.total - len(self.clock.remaining)
        if self.is_enabled and (bar.n % self.refresh_rate == 0 or not self.clock.remaining):
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.clock is None:
            super().on_train_epoch_end(trainer, pl_module)

    def eta_text(self) -> str:
        """The whole search's time left as h:mm:ss (``?`` before a generation has been timed)."""
        eta = None if self.clock is None else self.clock.eta(time.perf_counter() - self._started)
        return "?" if eta is None else Tqdm.format_interval(eta)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        engine = self._engine(pl_module)
        if self.clock is None or engine is None:
            return items
        for key in ("block", "pass", "gen"):  # SearchLogger's numbers for other bars, shown formatted here
            items.pop(key, None)
        version = trainer.logger.version if trainer.logger is not None else None
        if isinstance(version, str) and version.startswith("version_"):  # pinned by `fit --ckpt_path last`
            items["v_num"] = version.removeprefix("version_")
        passes, cycles = engine.num_visits // engine.num_blocks, engine.config.num_cycles
        if self.last is not None:
            r = self.last
            block, pass_index, gen, best = r.block, r.pass_index, r.index, r.best_fitness
        else:  # nothing ran yet in this process: where the search stands
            state, visit = engine.state, min(engine.next_visit, engine.num_visits - 1)
            block, pass_index = engine.schedule[visit], visit // engine.num_blocks
            gen = state.generation if visit == state.visit else 0
            best = state.current_fitness
        return {"block": block, "pass": f"{pass_index + 1}/{passes}", "gen": f"{gen}/{cycles}",
                "best": "-" if best is None else f"{best:.5f}", "ETA": self.eta_text(), **items}
