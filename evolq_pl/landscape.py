"""The fitness landscape of one block's weight scales along seeded random directions (the paper's Figure 1).

Evol-Q rests on the claim that the loss of a quantized ViT, as a function of a block's quantization scales, is
jagged at small perturbations: full of local minima where a gradient would stop. This module draws that function.
It scores the model exactly as the search scores a candidate (the configured fitness against the FP teacher, mean
over the calibration batches, the block's input computed once and only the suffix re-run) at the scales
``s * (1 + t d)`` along each of a few unit-RMS random directions ``d`` (or ``s * (1 + t1 d1 + t2 d2)`` over a
grid of two) for signed relative steps ``t``, and writes the values (CSV), their pictures (PNG, Agg canvas; no
pyplot state) and a roughness figure per direction.

``python cli.py landscape --config <cfg> [--ckpt_path last.ckpt] --block B`` runs it (``EvolQTrainer.landscape``);
``python -m evolq_pl.landscape`` takes the same arguments.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from evolq_pl.fitness import FitnessAccumulator, FitnessFn, get_fitness
from evolq_pl.models.base import QuantizedModel
from evolq_pl.search.evaluator import fp_teachers
from evolq_pl.search.scales import ScaleVector
from evolq_pl.trainer import quantized_model_for

if TYPE_CHECKING:
    from evolq_pl.data import CalibrationDataModule
    from evolq_pl.module import EvolQModule

Context = Callable[[], AbstractContextManager[Any]]


def step_grid(points: int = 13, min_step: float = 1e-4, max_step: float = 1e-1,
              spacing: Literal["log", "linear"] = "log") -> list[float]:
    """Relative steps in increasing order: 0 and ``points`` magnitudes of each sign, log-spaced from ``min_step``
    to ``max_step`` (13 points: four per decade over 1e-4..1e-1) or evenly spaced up to ``max_step``."""
    if points < 1:
        raise ValueError(f"points={points}: give at least 1 step of each sign")
    if not 0 < min_step < max_step < 1:
        raise ValueError(f"steps must satisfy 0 < min_step < max_step < 1, got {min_step} and {max_step}")
    if spacing == "log":
        magnitudes = np.geomspace(min_step, max_step, points) if points > 1 else np.array([max_step])
    elif spacing == "linear":
        magnitudes = np.linspace(max_step / points, max_step, points)
    else:
        raise ValueError(f"spacing={spacing!r}: choose log or linear")
    return [float(-m) for m in magnitudes[::-1]] + [0.0] + [float(m) for m in magnitudes]


def random_directions(numel: int, count: int, seed: int) -> torch.Tensor:
    """``count`` Gaussian directions of ``numel`` values (float64, CPU), each scaled to unit RMS, so that a
    relative step t moves a typical scale by t of itself whatever the block's size."""
    generator = torch.Generator().manual_seed(seed)
    d = torch.randn(count, numel, generator=generator, dtype=torch.float64)
    return d / d.pow(2).mean(dim=1, keepdim=True).sqrt()


def perturbed(scales: torch.Tensor, directions: torch.Tensor, steps: Sequence[float]) -> torch.Tensor:
    """``scales * (1 + sum_k steps[k] * directions[k])``, in the dtype of ``scales``."""
    factor = 1.0 + torch.tensor(steps, dtype=torch.float64) @ directions
    return (scales.double() * factor).to(scales.dtype)


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


class SuffixScorer:
    """Scores the model as it stands from block ``block``'s cached input, as the search scores a candidate.

    ``calib`` are the calibration batches; ``heldout`` the (images, labels) batches of a held-out split, or empty.
    The FP teacher's logits (``int_ln_teacher``: integer LayerNorm left on, the original's teacher) and the block
    inputs are computed once, here: the model must already hold the scales every later score starts from.
    """

    def __init__(self, qmodel: QuantizedModel, block: int, calib: Iterable[Any], fitness_fn: FitnessFn,
                 heldout: Iterable[Any] = (), device: torch.device | str = "cpu", int_ln_teacher: bool = False,
                 context: Context = nullcontext) -> None:
        self.qmodel, self.block, self.fitness_fn = qmodel, block, fitness_fn
        self.device, self.context = torch.device(device), context
        images = [_images(b).to(self.device) for b in calib]
        if not images:
            raise ValueError("the calibration loader yielded no batches: give calib_size >= 1")
        with torch.no_grad():
            self.teacher = fp_teachers(qmodel, images, keep_int_norm=int_ln_teacher)
            with context():
                self.inputs = [qmodel.forward_to(block, x) for x in images]
                self.heldout = [(qmodel.forward_to(block, x.to(self.device)), y.to(self.device)) for x, y in heldout]

    @torch.no_grad()
    def fitness(self) -> float:
        """Mean over the calibration batches of the fitness against the teacher (lower is better)."""
        acc = FitnessAccumulator(self.device)
        with self.context():
            for hidden, teacher in zip(self.inputs, self.teacher, strict=True):
                acc.add(self.fitness_fn(self.qmodel.forward_from(self.block, hidden), teacher))
        return acc.mean()

    @torch.no_grad()
    def top1(self) -> float | None:
        """Top-1 (%) on the held-out split, or None without one."""
        if not self.heldout:
            return None
        correct = total = 0
        with self.context():
            for hidden, labels in self.heldout:
                correct += int((self.qmodel.forward_from(self.block, hidden).argmax(dim=1) == labels).sum())
                total += len(labels)
        return 100.0 * correct / total


@dataclass(frozen=True)
class Roughness:
    """How jagged one line of the landscape is.

    ``local_minima``: strict interior minima (runs of equal values count once). ``tv_ratio``: the fitness's total
    variation divided by its net change, each side of step 0 on its own: 1.0 when the fitness only rises or only
    falls away from the model, larger the more it turns back; inf when the ends equal the centre.
    """

    local_minima: int
    points: int
    tv_ratio: float


def roughness(values: Sequence[float], centre: int) -> Roughness:
    """The :class:`Roughness` of ``values`` ordered by step, step 0 at index ``centre``."""
    v = [x for i, x in enumerate(values) if i == 0 or x != values[i - 1]]  # plateaus count once
    minima = sum(1 for i in range(1, len(v) - 1) if v[i] < v[i - 1] and v[i] < v[i + 1])
    sides = (values[centre::-1], values[centre:])
    tv = sum(abs(b - a) for side in sides for a, b in zip(side, side[1:], strict=False))
    net = sum(abs(side[-1] - side[0]) for side in sides)
    ratio = tv / net if net > 0 else (1.0 if tv == 0 else math.inf)
    return Roughness(minima, len(values), ratio)


@dataclass
class Landscape:
    """Scores along each direction at ``steps`` (the others at 0), or with ``surface`` on the whole grid
    ``steps`` x ``steps`` of two directions."""

    steps: list[float]
    directions: int
    surface: bool = False
    rows: list[dict[str, float | None]] = field(default_factory=list)
    title: str = ""

    @property
    def centre(self) -> int:
        return self.steps.index(0.0)

    @property
    def has_heldout(self) -> bool:
        return any(r["heldout_top1"] is not None for r in self.rows)

    def value(self, steps: Sequence[float], key: str = "fitness") -> float | None:
        for r in self.rows:
            if all(r[f"step_{k}"] == t for k, t in enumerate(steps)):
                return r[key]
        raise KeyError(f"no point at steps {tuple(steps)}")

    def line(self, direction: int, key: str = "fitness") -> list[float | None]:
        """Values along one direction (the others at step 0), in step order."""
        at = [0.0] * self.directions
        out = []
        for t in self.steps:
            at[direction] = t
            out.append(self.value(at, key))
        return out

    def grid(self, key: str = "fitness") -> np.ndarray:
        """A surface's values as a [len(steps), len(steps)] array indexed [step_1, step_0]."""
        if not self.surface:
            raise ValueError("only a surface landscape (two directions, surface=True) has a grid")
        return np.array([[self.value((t0, t1), key) for t0 in self.steps] for t1 in self.steps], dtype=float)

    def roughness(self, direction: int) -> Roughness:
        return roughness(self.line(direction), self.centre)

    def summary(self) -> str:
        """The one-line roughness figure."""
        parts = []
        for k in range(self.directions):
            r = self.roughness(k)
            parts.append(f"direction {k}: {r.local_minima} local minima on {r.points} steps, total variation "
                         f"{r.tv_ratio:.2f}x the net change")
        return "; ".join(parts) + " (1.00x: monotone away from step 0)"


@torch.no_grad()
def grid_points(steps: Sequence[float], directions: int, surface: bool = False) -> list[tuple[float, ...]]:
    """The points a sweep scores: step 0 once, then each direction's line (the others at 0); or with ``surface``
    every pair of steps of two directions."""
    if directions < 1:
        raise ValueError(f"directions={directions}: give at least 1")
    if surface:
        if directions != 2:
            raise ValueError(f"a surface spans two directions, not {directions}")
        return [(t0, t1) for t1 in steps for t0 in steps]
    origin = (0.0,) * directions
    return [origin] + [origin[:k] + (t,) + origin[k + 1:] for k in range(directions) for t in steps if t != 0.0]


@torch.no_grad()
def sweep(scales: ScaleVector, scorer: SuffixScorer, steps: Sequence[float], directions: int = 2,
          surface: bool = False, seed: int = 0, on_point: Callable[[int, int], None] | None = None) -> Landscape:
    """Score the model at every point of :func:`grid_points` along seeded random directions, then put the scales
    back as they were, also when interrupted."""
    if 0.0 not in steps:
        raise ValueError("the step grid must contain 0 (the model as it stands)")
    points = grid_points(steps, directions, surface)
    origin = scales.get()
    vectors = random_directions(scales.numel, directions, seed)
    out = Landscape(list(steps), directions, surface)
    try:
        for i, point in enumerate(points):
            scales.set(perturbed(origin, vectors, point))
            row: dict[str, float | None] = {f"step_{k}": t for k, t in enumerate(point)}
            row["fitness"] = scorer.fitness()
            row["heldout_top1"] = scorer.top1()
            out.rows.append(row)
            if on_point is not None:
                on_point(i + 1, len(points))
    finally:
        scales.set(origin)
    return out


def write_csv(landscape: Landscape, path: str | Path) -> Path:
    """One row per grid point: step_0[, step_1], fitness, heldout_top1 (empty without a held-out split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f"step_{k}" for k in range(landscape.directions)] + ["fitness", "heldout_top1"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in landscape.rows:
            writer.writerow({k: "" if row[k] is None else repr(row[k]) for k in fields})
    return path


def read_csv(path: str | Path) -> Landscape:
    """A landscape back from :func:`write_csv` (to redraw it or compare runs)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "fitness" not in rows[0]:
        raise ValueError(f"{path} is not a landscape CSV (no fitness column)")
    directions = sum(1 for k in rows[0] if k.startswith("step_"))
    parsed = [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in rows]
    steps = sorted({r["step_0"] for r in parsed})
    surface = directions == 2 and len(parsed) == len(steps) ** 2  # lines have 2 len(steps) - 1 rows
    return Landscape(steps, directions, surface, parsed)


def _xaxis(ax: Any, steps: Sequence[float]) -> None:
    positive = [t for t in steps if t > 0]
    if len(positive) > 2 and positive[-1] / positive[0] > 20:  # log-spaced: symmetric log axis around 0
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
    else:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.axvline(0.0, color="0.6", lw=0.8, zorder=0)
    ax.grid(True, which="major", alpha=0.3)


def plot_lines(landscape: Landscape, fitness_name: str = "fitness") -> Figure:
    """Fitness (and held-out top-1) along each direction against the signed relative step."""
    rows = 2 if landscape.has_heldout else 1
    fig = Figure(figsize=(7.0, 2.6 * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    centre = landscape.value([0.0] * landscape.directions)
    for k in range(landscape.directions):
        r = landscape.roughness(k)
        label = f"direction {k}: {r.local_minima} local minima, TV/net {r.tv_ratio:.2f}"
        axes[0].plot(landscape.steps, [v - centre for v in landscape.line(k)], marker="o", ms=2.5, lw=1,
                     label=label)
        if rows == 2:
            axes[1].plot(landscape.steps, landscape.line(k, "heldout_top1"), marker="o", ms=2.5, lw=1)
    axes[0].set_ylabel(f"{fitness_name} - {centre:.5f}\n(calibration; lower is better)")
    axes[0].legend(fontsize=8)
    if rows == 2:
        axes[1].set_ylabel("held-out top-1 (%)")
    for ax in axes:
        _xaxis(ax, landscape.steps)
    axes[-1].set_xlabel("relative step t (scales x (1 + t d))")
    fig.suptitle(landscape.title, fontsize=9)
    return fig


def plot_surface(landscape: Landscape, fitness_name: str = "fitness") -> Figure:
    """The fitness (and held-out top-1) over the grid of two directions, one cell per grid point."""
    keys = ["fitness"] + (["heldout_top1"] if landscape.has_heldout else [])
    fig = Figure(figsize=(4.6 * len(keys), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    n = len(landscape.steps)
    ticks = sorted({0, landscape.centre, n - 1, landscape.centre // 2, landscape.centre + (n - landscape.centre) // 2})
    labels = [f"{landscape.steps[i]:.0e}" if landscape.steps[i] else "0" for i in ticks]
    centre = landscape.value((0.0, 0.0))
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        values = landscape.grid(key) - (centre if key == "fitness" else 0.0)
        image = ax.imshow(values, origin="lower", cmap="viridis" if key == "fitness" else "magma",
                          interpolation="nearest")
        ax.plot([landscape.centre], [landscape.centre], marker="s", ms=9, mfc="none", mec="red", mew=1.2)
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("step along direction 0")
        ax.set_ylabel("step along direction 1")
        ax.set_title(f"{fitness_name} - {centre:.5f} (calibration)" if key == "fitness" else "held-out top-1 (%)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(landscape.title, fontsize=9)
    return fig


def save_figures(landscape: Landscape, stem: str | Path, fitness_name: str = "fitness") -> dict[str, Figure]:
    """``<stem>_lines.png`` (and ``<stem>_surface.png`` for a surface); returns the figures by kind."""
    figures = {"lines": plot_lines(landscape, fitness_name)}
    if landscape.surface:
        figures["surface"] = plot_surface(landscape, fitness_name)
    for kind, fig in figures.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        compact_png(buffer, f"{stem}_{kind}.png")
    return figures


def compact_png(source: str | Path | io.BytesIO, dest: str | Path) -> None:
    """A PNG as 256 colours (a plot has a few; the file shrinks about 2.5x and looks the same)."""
    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=256).save(dest, optimize=True)


def landscape_command(trainer: Trainer, model: EvolQModule, datamodule: CalibrationDataModule | None,
                      ckpt_path: str | None, block: int | None, directions: int = 2, surface: bool = False,
                      seed: int = 0, points: int = 13, min_step: float = 1e-4, max_step: float = 0.1,
                      spacing: Literal["log", "linear"] = "log", heldout: bool = True) -> dict[str, Any]:
    """The ``landscape`` verb (options documented at ``EvolQTrainer.landscape``): sweep, CSV, PNGs, TensorBoard."""
    blocks = model.qmodel.search_blocks(include_mlp=model.hparams.search_mlp)
    if block is None or not 0 <= block < len(blocks):
        raise ValueError(f"--block {block}: give the index of a search block, 0 to {len(blocks) - 1} "
                         f"({len(blocks)} blocks in {model.hparams.model_name})")
    steps = step_grid(points, min_step, max_step, spacing)
    if directions < 1 or (surface and directions != 2):
        raise ValueError(f"--directions {directions}: give 1 or more lines, or 2 with --surface true")
    if datamodule is None:
        raise ValueError("the landscape scores the calibration set: give the config a data: section")
    fitness_fn = get_fitness(model.hparams.fitness, model.hparams.temperature)
    qmodel, what = quantized_model_for(model, datamodule, ckpt_path)
    datamodule.setup("fit")
    qmodel.to(trainer.strategy.root_device)
    scorer = SuffixScorer(qmodel, block, datamodule.calib_dataloader(), fitness_fn,
                          datamodule.val_dataloader() if heldout else (), trainer.strategy.root_device,
                          int_ln_teacher=model.hparams.teacher == "int_ln",
                          context=trainer.precision_plugin.train_step_context)
    rank_zero_info(f"landscape of {blocks[block].name} ({what}): "
                   f"{len(grid_points(steps, directions, surface))} points")
    result = sweep(ScaleVector(blocks[block].layers), scorer, steps, directions, surface, seed)
    result.title = (f"{model.hparams.model_name} W{model.qconfig.w_bits}A{model.qconfig.a_bits}, "
                    f"{blocks[block].name} ({'searched' if ckpt_path else 'calibrated baseline'}), seed {seed}")
    out = Path(trainer.log_dir or trainer.default_root_dir)
    csv_path = write_csv(result, out / f"landscape_block{block}.csv")
    figures = save_figures(result, out / f"landscape_block{block}", model.hparams.fitness)
    if isinstance(trainer.logger, TensorBoardLogger):
        for kind, fig in figures.items():
            trainer.logger.experiment.add_figure(f"landscape/block{block}_{kind}", fig, close=False)
        trainer.logger.experiment.flush()
    rank_zero_info(f"landscape of {blocks[block].name}: {result.summary()}; {csv_path} and PNGs")
    return {"csv": str(csv_path), "fitness_at_0": result.value([0.0] * directions), "summary": result.summary()}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m evolq_pl.landscape ARGS`` is ``python cli.py landscape ARGS``."""
    from evolq_pl.cli import cli_main

    if argv is None:  # the program's own command line, read by the CLI as cli.py's is
        sys.argv[1:] = ["landscape", *sys.argv[1:]]
        cli_main()
    else:
        cli_main(["landscape", *argv])


if __name__ == "__main__":
    main()
