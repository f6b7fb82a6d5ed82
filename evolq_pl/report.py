"""The run report: one picture of a whole search, so a person sees it without starting TensorBoard.

:class:`SearchRecord` keeps, per generation, the best calibration fitness and how many children were kept; per block
visit, the fitness before and after; and the held-out top-1 where it was measured. It is plain lists, so that the
callback holding it (``evolq_pl.callbacks.RunReport``) saves it in every checkpoint and a resumed search still draws
from its first generation. :func:`plot_report` draws it on an Agg canvas (no pyplot state).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evolq_pl.landscape import compact_png
from evolq_pl.search.engine import Generation

_PER_GENERATION = ("generation", "pass_index", "best_fitness", "candidates", "accepted")
_PER_VISIT = ("visit", "visit_pass", "visit_block", "visit_before", "visit_after")
_PER_HELDOUT = ("heldout_generation", "heldout_top1")


@dataclass
class SearchRecord:
    """What the report draws, one list entry per generation / per block visit / per held-out measurement."""

    generation: list[int] = field(default_factory=list)
    """Generations of the whole search so far, this one included (1, 2, ...)."""
    pass_index: list[int] = field(default_factory=list)
    best_fitness: list[float] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    visit: list[int] = field(default_factory=list)
    """Per finished block visit: its index in the schedule, pass, block, and the fitness before and after it."""
    visit_pass: list[int] = field(default_factory=list)
    visit_block: list[int] = field(default_factory=list)
    visit_before: list[float] = field(default_factory=list)
    visit_after: list[float] = field(default_factory=list)
    heldout_generation: list[int] = field(default_factory=list)
    """Per held-out validation: the generations done when it ran, and the top-1 (%)."""
    heldout_top1: list[float] = field(default_factory=list)

    def add(self, report: Generation, generations_per_visit: int) -> None:
        """Record one generation; one already recorded (redone after a resume) replaces its entry and what followed."""
        number = report.visit * generations_per_visit + report.index
        if self.generation and number <= self.generation[-1]:
            self._drop_from(number, report.visit)
        self.generation.append(number)
        self.pass_index.append(report.pass_index)
        self.best_fitness.append(report.best_fitness)
        self.candidates.append(len(report.fitnesses))
        self.accepted.append(report.accepted)
        visit = report.visit_summary
        if visit is not None:
            self.visit.append(report.visit)
            self.visit_pass.append(report.pass_index)
            self.visit_block.append(visit.block)
            self.visit_before.append(visit.fitness_before)
            self.visit_after.append(visit.fitness_after)

    def add_heldout(self, top1: float) -> None:
        """Record a held-out top-1 measured after the last recorded generation (a repeat replaces it)."""
        done = self.generation[-1] if self.generation else 0
        if self.heldout_generation and self.heldout_generation[-1] == done:
            self.heldout_top1[-1] = float(top1)
            return
        self.heldout_generation.append(done)
        self.heldout_top1.append(float(top1))

    def _drop_from(self, number: int, visit: int) -> None:
        for names, kept in ((_PER_GENERATION, sum(g < number for g in self.generation)),
                            (_PER_VISIT, sum(v < visit for v in self.visit)),
                            (_PER_HELDOUT, sum(g < number for g in self.heldout_generation))):
            for name in names:
                del getattr(self, name)[kept:]

    def __len__(self) -> int:
        return len(self.generation)

    def state_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
        for f in fields(self):
            setattr(self, f.name, list(state.get(f.name, [])))


def acceptance_per_pass(record: SearchRecord) -> dict[int, float]:
    """Per pass (0-based): the percentage of children that the strategy kept."""
    kept: dict[int, list[int]] = {}
    for p, accepted, candidates in zip(record.pass_index, record.accepted, record.candidates, strict=True):
        total = kept.setdefault(p, [0, 0])
        total[0] += accepted
        total[1] += candidates
    return {p: 100.0 * a / c if c else 0.0 for p, (a, c) in kept.items()}


def _fitness_panel(ax: Any, record: SearchRecord, baseline: float, fitness_name: str) -> None:
    x, y = list(record.generation), [f - baseline for f in record.best_fitness]
    if x[0] == 1:  # the whole search: start from the calibrated baseline
        x, y = [0, *x], [0.0, *y]
    ax.step(x, y, where="post", lw=1.2, color="C0")
    ax.axhline(0.0, color="0.6", lw=0.8, ls="--", zorder=0)
    starts = [g - 1 for g, p, q in zip(record.generation[1:], record.pass_index[1:], record.pass_index, strict=False)
              if p != q]
    for g in starts:
        ax.axvline(g, color="0.8", lw=0.8, zorder=0)
    ax.set_xlim(0, max(x) + 0.5)
    passes = len(set(record.pass_index))
    ax.set_xlabel(f"generation ({passes} pass{'es' if passes > 1 else ''} over the blocks"
                  f"{'; grey lines: a new pass' if passes > 1 else ''})")
    ax.set_ylabel(f"best {fitness_name} - baseline\n(calibration; lower is better)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"calibration fitness per generation (baseline {baseline:.5f})", fontsize=9)
    ax.grid(True, alpha=0.3)


def _visits_panel(ax: Any, record: SearchRecord) -> None:
    if not record.visit:
        ax.text(0.5, 0.5, "no block visit finished", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    gains = [before - after for before, after in zip(record.visit_before, record.visit_after, strict=True)]
    ax.bar(record.visit, gains, width=0.8, color=[f"C{p % 2}" for p in record.visit_pass])
    if len(record.visit) <= 40:
        ax.set_xticks(record.visit, [str(b) for b in record.visit_block], fontsize=7)
        ax.set_xlabel("block visit (tick: the block; colour: the pass)")
    else:
        ax.set_xlabel("block visit (blocks last to first in each pass; colour: the pass)")
    ax.set_ylabel("fitness before - after")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("what each block visit gained", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def _acceptance_panel(ax: Any, record: SearchRecord) -> None:
    rates = acceptance_per_pass(record)
    passes = [p + 1 for p in rates]
    bars = ax.bar(passes, list(rates.values()), width=0.7, color="C2")
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(passes)
    ax.set_ylim(0, max(100.0, *rates.values()) * 1.08)
    ax.set_xlabel("pass")
    ax.set_ylabel("children kept (%)")
    ax.set_title("acceptance rate per pass", fontsize=9)


def _heldout_panel(ax: Any, record: SearchRecord, last_generation: int) -> None:
    ax.plot(record.heldout_generation, record.heldout_top1, marker="o", ms=3, lw=1, color="C3")
    ax.set_xlim(0, max(last_generation, *record.heldout_generation) + 0.5)
    ax.set_xlabel("generation")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("held-out top-1 (a split of train, never the test set)", fontsize=9)
    ax.grid(True, alpha=0.3)


def plot_report(record: SearchRecord, baseline: float, title: str, fitness_name: str = "fitness") -> Figure:
    """Fitness per generation, gain per block visit, acceptance per pass and (where measured) held-out top-1."""
    if not record:
        raise ValueError("the search record is empty: no generation ran")
    heldout = bool(record.heldout_top1)
    top = ["fitness", "heldout"] if heldout else ["fitness", "fitness"]
    fig = Figure(figsize=(11.0, 7.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic([top, ["visits", "acceptance"]])
    _fitness_panel(axes["fitness"], record, baseline, fitness_name)
    if heldout:
        _heldout_panel(axes["heldout"], record, record.generation[-1])
    _visits_panel(axes["visits"], record)
    _acceptance_panel(axes["acceptance"], record)
    fig.suptitle(title, fontsize=10)
    return fig


def summary(record: SearchRecord, baseline: float, fitness_name: str = "fitness") -> str:
    """One line: the fitness from the baseline to now, in how many generations."""
    return (f"calibration {fitness_name} {baseline:.5f} -> {record.best_fitness[-1]:.5f} after "
            f"{record.generation[-1]} generations")


def save_report(record: SearchRecord, path: str | Path, baseline: float, title: str,
                fitness_name: str = "fitness") -> Path:
    """Draw the report and write it as a compact PNG at ``path``."""
    buffer = io.BytesIO()
    plot_report(record, baseline, title, fitness_name).savefig(buffer, format="png", dpi=100)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compact_png(buffer, path)
    return path
