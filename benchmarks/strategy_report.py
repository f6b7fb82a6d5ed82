"""The search-strategy comparison of issue 15: the pre-registered held-out pick, the test table, and the plot of the
share of the FP gap recovered against fitness evaluations (PNG and TensorBoard scalars).

    python -m benchmarks.strategy_report \
        --rows benchmarks/results/accuracy_cpu_strategies_mf.json benchmarks/results/accuracy_cpu_strategies_cmaes.json \
        --evolq benchmarks/results/accuracy_cpu_vit12s_w2_heldout.json ... --png benchmarks/strategies_gap.png

The rule (benchmarks/preregistration_strategies.md): per model and W/A, the candidate with the best mean held-out
top-1 over the seeds; a margin within ``--noise`` points is a tie, won by the first of ``--candidates``. Round 2
(benchmarks/preregistration_gradient.md) adds ``--standing``: an earlier round's pick, which the new pick replaces
only with a held-out margin above the noise (one per model where they differ: each model takes the first it has).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

CANDIDATES = ("multifidelity", "cmaes")
EVOLQ = {"eps=0.001 heldout_size=5000": "evolq (paper: infoNCE, eps 1e-3)",
         "eps=0.001 fused=true heldout_size=5000": "evolq (paper: infoNCE, eps 1e-3)",
         "eps=0.003 fitness=kl fused=true heldout_size=5000": "evolq (KL, eps 3e-3)",
         "fused=true heldout_size=5000": "evolq (paper: infoNCE, its eps for the width)"}


SUFFIXES = {"search_jointly=true": "-joint", "search_head=true": "-head", "strategy.steps=[0.1,0.3]": "-large",
            "search_mlp=true": "-mlp", "search_stem=true": "-stem", "strategy.mutation_units={stem:4}": "4",
            "strategy.mutation_units={stem:2}": "2", "strategy.local_grid=": "-grid"}
"""Settings that tell candidates of one strategy apart (round 4's one unit for the whole model and the head, round
3's larger steps, round 2's MLP scales, round 5's stem and its mutations per pass, round 6's grid), in name order;
a key ending in ``=`` stands for any value."""


def label(row: dict[str, Any]) -> str | None:
    """The strategy a row ran: a candidate's name, one of the evolq comparison settings, or None (not compared)."""
    if row.get("strategy", "evolq") != "evolq":
        settings = row.get("settings", "").split()
        return row["strategy"] + "".join(suffix for pair, suffix in SUFFIXES.items() if any(
            item == pair or (pair.endswith("=") and item.startswith(pair)) for item in settings))
    return EVOLQ.get(row.get("settings", ""))


def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[int, dict[str, Any]]]]:
    """(checkpoint, W) -> strategy label -> seed -> row."""
    out: dict[tuple[str, int], dict[str, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        name = label(r)
        if name is not None:
            out.setdefault((r["checkpoint"], r["w_bits"]), {}).setdefault(name, {})[r["seed"]] = r
    return out


SEARCH_BLOCKS = {"vit12s_fmnist.pth": 12, "levit_fmnist.pth": 8}


def spent(row: dict[str, Any]) -> float | None:
    """Fitness evaluations of a row's search; rows from before the field ran the paper's 3 per visit."""
    if "evaluations" in row:
        return row["evaluations"]
    blocks = SEARCH_BLOCKS.get(row["checkpoint"])
    return None if blocks is None else blocks * row["passes"] * 3 + 1


def mean(values) -> float:
    return statistics.mean(values)


def heldout(by_label: dict[str, dict[int, dict[str, Any]]], name: str, seeds: list[int],
            metric: str = "top1") -> float | None:
    """A strategy's mean held-out ``metric`` (top-1, or ``kl_fp``) over the seeds, or None where a seed is missing."""
    rows = by_label.get(name, {})
    return mean(rows[s]["heldout"]["evolq"][metric] for s in seeds) if all(s in rows for s in seeds) else None


def pick(by_label: dict[str, dict[int, dict[str, Any]]], seeds: list[int], candidates: tuple[str, ...],
         noise: float, standing: str | None = None, kl_tie: float | None = None) -> tuple[str | None, str]:
    """The pre-registered choice among the candidates with every seed, and how it was made; with ``standing`` (an
    earlier round's pick), the choice replaces it only by a held-out margin above ``noise``. With ``kl_tie`` (round
    4), a tie goes to the strategy whose mean held-out KL to FP is lower by more than that fraction (the first
    listed's, or the standing pick's), else as before."""
    scores = [(score, c) for c in candidates if (score := heldout(by_label, c, seeds)) is not None]
    if not scores:
        return None, "no candidate has every seed"

    def lower_kl(name: str, than: str) -> bool:
        return kl_tie is not None and heldout(by_label, name, seeds, "kl_fp") < (1 - kl_tie) * heldout(
            by_label, than, seeds, "kl_fp")

    best = max(score for score, _ in scores)
    tied = [c for score, c in scores if best - score <= noise]
    chosen = tied[0]  # scores keep the candidates' order: the first listed wins a tie
    if len(tied) > 1 and kl_tie is not None:
        lowest = min(tied, key=lambda c: heldout(by_label, c, seeds, "kl_fp"))
        chosen = lowest if lower_kl(lowest, tied[0]) else tied[0]
    others = [f"{c} {score:.2f}" for score, c in scores]
    margin = best - max((score for score, c in scores if c != chosen), default=best)
    how = (f"margin {margin:.2f}" if len(tied) == 1 else "tie, first listed" if chosen == tied[0]
           else f"tie, held-out KL more than {kl_tie:.0%} lower")
    old = None if standing is None else heldout(by_label, standing, seeds)
    if old is None:
        return chosen, f"held-out {', '.join(others)} ({how})"
    ahead = dict((c, score) for score, c in scores)[chosen] - old
    if abs(ahead) <= noise and kl_tie is not None:
        replaces = lower_kl(chosen, standing)
        kl = f"a tie; held-out KL {heldout(by_label, chosen, seeds, 'kl_fp'):.4f} vs " \
             f"{heldout(by_label, standing, seeds, 'kl_fp'):.4f}, "
    else:
        replaces, kl = ahead > noise, ""
    verdict = f"{ahead:+.2f} over {standing}: {kl}" + ("replaces it" if replaces else f"{standing} stands")
    return (chosen if replaces else standing), f"held-out {', '.join(others)} ({how}); {verdict}"


def table(grouped, seeds: list[int], candidates: tuple[str, ...], noise: float, standing: tuple[str, ...] = (),
          kl_tie: float | None = None) -> str:
    """The rows of every (model, width) with each one's pick; ``standing``: earlier picks, each group's the first
    of them it has rows of (models of one round can have different standing picks)."""
    lines = ["| model | W/A | strategy | evaluations | held-out top-1 | test top-1 (base → searched) | Δ paired "
             "| gap recovered | search s | held-out pick |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (ckpt, w), by_label in grouped.items():
        old = next((name for name in standing if name in by_label), None)
        chosen, how = pick(by_label, seeds, candidates, noise, old, kl_tie)
        for name, rows in by_label.items():
            if not all(s in rows for s in seeds):
                continue
            rs = [rows[s] for s in seeds]
            fp, base = mean(r["fp"]["top1"] for r in rs), mean(r["baseline"]["top1"] for r in rs)
            top1 = mean(r["evolq"]["top1"] for r in rs)
            deltas = [r["evolq"]["top1"] - r["baseline"]["top1"] for r in rs]
            sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            evaluations = spent(rs[0])
            evaluations = "?" if evaluations is None else f"{evaluations:.0f}"
            mark = (f"**picked**: {how}" if name == chosen else "replaced" if name == old
                    else "not picked" if name in candidates else "comparison")
            lines.append(
                f"| {ckpt.removesuffix('_fmnist.pth')} | W{w}A8 | {name} | {evaluations} | "
                f"{mean(r['heldout']['evolq']['top1'] for r in rs):.2f} | {base:.2f} → {top1:.2f} | "
                f"{mean(deltas):+.2f} ± {sd:.2f} | {(top1 - base) / (fp - base):.0%} | "
                f"{mean(r['search_s'] for r in rs):.0f} | {mark} |")
    return "\n".join(lines)


def baseline_check(grouped, seeds: list[int]) -> list[str]:
    """Rows whose baseline (test top-1, calibration fitness) differs from another strategy's row of the same seed:
    such a comparison would not share its starting point."""
    problems = []
    for (ckpt, w), by_label in grouped.items():
        for s in seeds:
            starts = {name: (rows[s]["baseline"]["top1"], rows[s]["fitness_before"]) for name, rows in by_label.items()
                      if s in rows and name in CANDIDATES}
            evolq = {name: rows[s]["baseline"]["top1"] for name, rows in by_label.items()
                     if s in rows and name not in CANDIDATES}
            tops = {v[0] for v in starts.values()} | set(evolq.values())
            if len(tops) > 1:
                problems.append(f"{ckpt} W{w} seed {s}: baselines differ {starts} {evolq}")
    return problems


def curves(grouped, seeds: list[int]) -> dict[tuple[str, int], dict[str, list[tuple[float, float]]]]:
    """(checkpoint, W) -> strategy -> [(evaluations, gap recovered of the seed-mean test top-1)]."""
    out: dict[tuple[str, int], dict[str, list[tuple[float, float]]]] = {}
    for key, by_label in grouped.items():
        for name, rows in by_label.items():
            if not all(s in rows for s in seeds):
                continue
            rs = [rows[s] for s in seeds]
            fp, base = mean(r["fp"]["top1"] for r in rs), mean(r["baseline"]["top1"] for r in rs)
            if all("curve" in r for r in rs):
                points = list(zip(*(r["curve"] for r in rs), strict=True))
                series = [(p[0]["evaluations"], (mean(q["top1"] for q in p) - base) / (fp - base)) for p in points]
            else:  # an endpoint only
                if spent(rs[0]) is None:
                    continue
                series = [(spent(rs[0]), (mean(r["evolq"]["top1"] for r in rs) - base) / (fp - base))]
            out.setdefault(key, {})[name] = series
    return out


def plot(data, png: Path, tensorboard: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    names = list(dict.fromkeys(name for by_label in data.values() for name in by_label))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per strategy in every panel
    for ax, ((ckpt, w), by_label) in zip(axes[0], data.items(), strict=True):
        for name, series in by_label.items():
            xs, ys = zip(*series, strict=True)
            ax.plot(xs, [100 * y for y in ys], marker="o", label=name, color=colors[name],
                    linestyle="-" if len(xs) > 1 else "none")
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{ckpt.removesuffix('_fmnist.pth')} W{w}A8 (mean of seeds)")
        ax.set_xlabel("fitness evaluations (full calibration set equivalents)")
        ax.set_ylabel("FP gap recovered on the test set (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tensorboard)) as writer:
            for (ckpt, w), by_label in data.items():
                for name, series in by_label.items():
                    tag = f"gap_recovered/{ckpt.removesuffix('_fmnist.pth')}_W{w}A8/{name.split(' ')[0]}"
                    if name.startswith("evolq"):
                        tag += "_kl" if "KL" in name else "_paper"
                    for x, y in series:
                        writer.add_scalar(tag, 100 * y, int(round(x)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", required=True, help="accuracy.py outputs of the candidates")
    parser.add_argument("--evolq", nargs="*", default=[], help="accuracy.py outputs holding the evolq rows")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="in pre-registered order")
    parser.add_argument("--standing", nargs="*", default=[],
                        help="earlier rounds' picks, replaced only beyond the noise (per model: the first it has)")
    parser.add_argument("--noise", type=float, default=0.18, help="held-out margin (points) that counts as a tie")
    parser.add_argument("--kl-tie", type=float, default=None,
                        help="round 4's tie rule: a tie goes to the strategy whose held-out KL to FP is lower by "
                             "more than this fraction (e.g. 0.06)")
    parser.add_argument("--png", default="")
    parser.add_argument("--tensorboard", default="", help="folder for the TensorBoard scalars of the plot")
    args = parser.parse_args(argv)
    rows = []
    for path in [*args.rows, *args.evolq]:
        if not Path(path).is_file():
            raise SystemExit(f"{path} does not exist: run benchmarks.accuracy first or drop it from the list")
        rows += json.loads(Path(path).read_text())
    grouped = groups(rows)
    print(table(grouped, args.seeds, tuple(args.candidates), args.noise, tuple(args.standing), args.kl_tie))
    for problem in baseline_check(grouped, args.seeds):
        print("BASELINE MISMATCH:", problem)
    if args.png:
        plot(curves(grouped, args.seeds), Path(args.png), Path(args.tensorboard) if args.tensorboard else None)


if __name__ == "__main__":
    main()
