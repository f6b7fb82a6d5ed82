"""Accuracy benchmark on Fashion-MNIST: FP vs calibrated baseline vs Evol-Q, per model, bit width and seed.

    python -m benchmarks.accuracy --checkpoints checkpoints/vit12_fmnist.pth checkpoints/levit_fmnist.pth \
        --bits 3:8 4:8 8:8 2:8 --seeds 0 1 2 --out benchmarks/accuracy.json

Calibration and search use ``calib_size`` images drawn from the 60k train split with the run's seed; the 10k test
split is read only to report numbers, after the search (nothing is selected on it). Per run it reports test top-1,
top-1 agreement with the FP model, KL(FP || quantized) on the test set, the calibration fitness before and after
the search, and wall times. ``--heldout-only`` reads no test image at all: it reports held-out top-1 only, for
exploring settings before a candidate list is pre-registered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from evolq_pl.data import DEFAULT_FASHION_MNIST_ROOT, FashionMNISTDataModule
from evolq_pl.module import EvolQModule
from evolq_pl.quant.modes import calibrate, quantization_disabled


@torch.no_grad()
def test_logits(module: EvolQModule, loader, device: torch.device, fp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    module.qmodel.to(device).eval()
    logits, labels = [], []
    for x, y in loader:
        x = x.to(device)
        if fp:
            with quantization_disabled(module.qmodel):
                out = module.qmodel(x)
        else:
            out = module.qmodel(x)
        logits.append(out.float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def compare(logits: torch.Tensor, fp_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(dim=1)
    kl = torch.nn.functional.kl_div(logits.log_softmax(1), fp_logits.log_softmax(1), log_target=True,
                                    reduction="batchmean")
    return {"top1": 100.0 * float((pred == labels).float().mean()),
            "agree_fp": 100.0 * float((pred == fp_logits.argmax(1)).float().mean()),
            "kl_fp": float(kl)}


def load_reference(ckpt: str, w_bits: int, a_bits: int, seed: int, args: argparse.Namespace, heldout_size: int = 0,
                   **module_kwargs: Any) -> tuple[EvolQModule, FashionMNISTDataModule]:
    """A shipped reference model (its ``meta`` names the timm model and image size) as an EvolQModule on
    ``args.device``, and its Fashion-MNIST splits: ``args.calib_size`` calibration images drawn with ``seed``."""
    meta = torch.load(ckpt, map_location="cpu", weights_only=True).get("meta", {})
    module = EvolQModule(model_name=meta.get("timm_name", "vit_tiny_patch16_224"), checkpoint_path=ckpt,
                         w_bits=w_bits, a_bits=a_bits, seed=seed, **module_kwargs)
    data = FashionMNISTDataModule(root=args.data_root, calib_size=args.calib_size, heldout_size=heldout_size,
                                  batch_size=100, test_batch_size=1000, seed=seed,
                                  image_size=meta.get("image_size"), generations_per_epoch=module.hparams.num_cycles)
    data.setup("test")
    return module.to(torch.device(args.device)), data


class Snapshots(Callback):
    """Every block's scales (and the evaluations spent) after every ``every``-th block visit and the last, for the
    test top-1 against evaluations curve; read after the search, so nothing in it can steer the search."""

    def __init__(self, every: int) -> None:
        self.every, self.taken = every, []

    def on_train_epoch_end(self, trainer: Trainer, module: EvolQModule) -> None:
        engine = module.engine
        visit = engine.state.visit + 1
        if visit % self.every == 0 or visit == engine.num_visits:
            self.taken.append((visit, engine.state.evaluations, engine.snapshot()))


def along_search(module: EvolQModule, snapshots: Snapshots, loader, fp_logits: torch.Tensor, labels: torch.Tensor,
                 device: torch.device, start: dict[str, float]) -> list[tuple[int, float, dict[str, float]]]:
    """(visit, evaluations, scores) from the baseline's ``start`` through each snapshot, scored on ``loader``."""
    points = [(0, 1, start)]
    for visit, evaluations, snapshot in snapshots.taken:
        with module.engine.applied(snapshot):
            points.append((visit, evaluations, compare(test_logits(module, loader, device)[0], fp_logits, labels)))
    return points


def run_one(ckpt: str, w_bits: int, a_bits: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One row: FP, calibrated baseline and Evol-Q on the same calibration draw."""
    device = torch.device(args.device)
    module, data = load_reference(ckpt, w_bits, a_bits, seed, args, heldout_size=args.heldout_size,
                                  num_passes=args.passes, **module_overrides(args.set))
    test = not args.heldout_only  # exploring settings before a pre-registration reads no test image
    if test:
        fp_logits, labels = test_logits(module, data.test_dataloader(), device, fp=True)
    heldout = args.heldout_size > 0  # train images outside calibration: what a user may select on
    if heldout:
        fp_heldout, heldout_labels = test_logits(module, data.val_dataloader(), device, fp=True)
    started = time.perf_counter()
    calibrate(module.qmodel, data.calib_dataloader(), fit_on=module.qconfig.fit_on, device=device)
    calib_s = time.perf_counter() - started
    baseline = compare(test_logits(module, data.test_dataloader(), device)[0], fp_logits, labels) if test else None
    if heldout:
        baseline_heldout = compare(test_logits(module, data.val_dataloader(), device)[0], fp_heldout, heldout_labels)

    started = time.perf_counter()
    snapshots = Snapshots(max(1, module.engine.num_visits // args.curve)) if args.curve else None
    trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                      callbacks=[snapshots] if snapshots else None,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      inference_mode=False, precision=args.precision, num_sanity_val_steps=0,
                      max_epochs=module.engine.num_visits,  # one epoch per block visit
                      check_val_every_n_epoch=len(module.blocks),  # held-out selection once per pass
                      limit_val_batches=1.0 if module.hparams.selection == "heldout" else 0)
    trainer.fit(module, datamodule=data)  # already calibrated: fit goes straight to the search
    search_s = time.perf_counter() - started
    searched = compare(test_logits(module, data.test_dataloader(), device)[0], fp_logits, labels) if test else None
    extra: dict[str, Any] = {"strategy": module.hparams.strategy, "evaluations": module.engine.state.evaluations}
    if snapshots and test:  # test top-1 along the search (reported only: the search and every choice are already made)
        extra["curve"] = [{"visit": visit, "evaluations": evaluations, "top1": scores["top1"]} for
                          visit, evaluations, scores in along_search(module, snapshots, data.test_dataloader(),
                                                                     fp_logits, labels, device, baseline)]
    if snapshots and heldout:  # the same on held-out train images: where a search starts to overfit its calibration
        extra["heldout_curve"] = [{"visit": visit, "evaluations": evaluations, **scores} for visit, evaluations, scores
                                  in along_search(module, snapshots, data.val_dataloader(), fp_heldout,
                                                  heldout_labels, device, baseline_heldout)]
    if heldout:
        extra["heldout"] = {"fp": compare(fp_heldout, fp_heldout, heldout_labels), "baseline": baseline_heldout,
                            "evolq": compare(
            test_logits(module, data.val_dataloader(), device)[0], fp_heldout, heldout_labels)}
    return {"checkpoint": Path(ckpt).name, "model": module.hparams.model_name, "w_bits": w_bits,
            "a_bits": a_bits, "seed": seed, "passes": args.passes, "calib_size": args.calib_size,
            "settings": settings_key(args),
            "fp": compare(fp_logits, fp_logits, labels) if test else None, "baseline": baseline, "evolq": searched,
            "fitness_before": module.baseline_fitness, "fitness_after": module.current_fitness,
            "calib_s": calib_s, "search_s": search_s,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **extra}


def parse_value(text: str) -> Any:
    """``true``/``false``, a number, a list of them (``[0.03,0.1]``), a flat mapping to them (``{stem:4}``), or the
    text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(item.strip()) for item in text[1:-1].split(",") if item.strip()]
    if text.startswith("{") and text.endswith("}"):
        pairs = [item.partition(":") for item in text[1:-1].split(",") if item.strip()]
        if not all(sep and key.strip() for key, sep, _ in pairs):
            raise SystemExit(f"--set value {text!r}: write a mapping as {{NAME:VALUE,...}}, e.g. {{stem:4}}")
        return {key.strip(): parse_value(value.strip()) for key, _, value in pairs}
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def module_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as EvolQModule arguments; ``quant.NAME=V`` goes to the QuantConfig (``quant_overrides``)."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: write NAME=VALUE, e.g. --set relative_mutation=true")
        if key.startswith("quant."):
            kwargs.setdefault("quant_overrides", {})[key.removeprefix("quant.")] = parse_value(value)
        elif key.startswith("strategy."):
            kwargs.setdefault("strategy_options", {})[key.removeprefix("strategy.")] = parse_value(value)
        elif key in ("w_bits", "a_bits", "num_passes", "seed", "checkpoint_path", "model_name"):
            raise SystemExit(f"--set {key}: use the benchmark's own option (--bits, --passes, --seeds, --checkpoints)")
        else:
            kwargs[key] = parse_value(value)
    return kwargs


def settings_key(args: argparse.Namespace) -> str:
    """The ``--set`` pairs (and a held-out split) in a canonical order: different settings never share a line."""
    pairs = sorted(args.set) + ([f"heldout_size={args.heldout_size}"] if args.heldout_size else [])
    return " ".join(pairs)


def mean_sd(values: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int, str], list[dict[str, Any]]]:
    """Rows by (model, W, A, search settings): one table line each, seeds pooled."""
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        search = f"{r['passes']} passes, {r['calib_size']} images {r.get('settings', '')}".strip()
        groups.setdefault((r["checkpoint"], r["w_bits"], r["a_bits"], search), []).append(r)
    return groups


def selection(rows: list[dict[str, Any]]) -> str:
    """Per (model, W/A): the search settings with the best mean held-out top-1 (train images outside calibration),
    and only then their test top-1. This is how a setting such as eps is chosen without reading the test set."""
    by_bits: dict[tuple[str, int, int], list[tuple[float, str, list[dict[str, Any]]]]] = {}
    for (ckpt, w, a, search), rs in group_rows(rows).items():
        if all("heldout" in r for r in rs):
            score = statistics.mean(r["heldout"]["evolq"]["top1"] for r in rs)
            by_bits.setdefault((ckpt, w, a), []).append((score, search, rs))
    if not by_bits:
        return ""
    out = ["| model | W/A | settings compared (held-out Evol-Q top-1) | held-out picks | its test top-1 (base → Evol-Q) "
           "| gap recovered |", "|---|---|---|---|---|---|"]
    for (ckpt, w, a), cands in by_bits.items():
        score, search, rs = max(cands, key=lambda c: c[0])  # the first of equal scores
        fp = statistics.mean(r["fp"]["top1"] for r in rs)
        base = statistics.mean(r["baseline"]["top1"] for r in rs)
        evo = statistics.mean(r["evolq"]["top1"] for r in rs)
        compared = "; ".join(f"{s}: {c:.2f}" for c, s, _ in cands)
        recovered = f"{(evo - base) / (fp - base):.0%}" if fp > base else "n/a"
        out.append(f"| {ckpt} | W{w}A{a} | {compared} | {search} | {base:.2f} → {evo:.2f} | {recovered} |")
    return "\n".join(out)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean ± sd over seeds per (model, bits), and the share of the FP gap the search recovers."""
    groups = group_rows(rows)
    out = ["| model | W/A | search | seeds | FP top-1 | baseline top-1 | Evol-Q top-1 | Δ top-1 (paired) | gap recovered "
           "| agree FP (base → Evol-Q) | KL to FP (base → Evol-Q) | calib fitness (base → Evol-Q) | search s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ckpt, w, a, search), rs in groups.items():
        fp = [r["fp"]["top1"] for r in rs]
        base = [r["baseline"]["top1"] for r in rs]
        evo = [r["evolq"]["top1"] for r in rs]
        delta = [e - b for e, b in zip(evo, base, strict=True)]
        gap = statistics.mean(fp) - statistics.mean(base)
        recovered = (statistics.mean(evo) - statistics.mean(base)) / gap if gap > 0 else float("nan")
        out.append(
            f"| {ckpt} | W{w}A{a} | {search} | {len(rs)} | {mean_sd(fp)} | {mean_sd(base)} | {mean_sd(evo)} | "
            f"{mean_sd(delta, signed=True)} | {recovered:.0%} | {statistics.mean(r['baseline']['agree_fp'] for r in rs):.2f} → "
            f"{statistics.mean(r['evolq']['agree_fp'] for r in rs):.2f} | "
            f"{statistics.mean(r['baseline']['kl_fp'] for r in rs):.4f} → "
            f"{statistics.mean(r['evolq']['kl_fp'] for r in rs):.4f} | "
            f"{statistics.mean(r['fitness_before'] for r in rs):.4f} → "
            f"{statistics.mean(r['fitness_after'] for r in rs):.4f} | "
            f"{statistics.mean(r['search_s'] for r in rs):.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", help="reference model files (with meta)")
    parser.add_argument("--bits", nargs="+", default=["3:8", "4:8", "8:8"], help="W:A pairs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--heldout-size", type=int, default=0,
                        help="train images held out for selection (with --set selection=heldout); never the test set")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="EvolQModule arguments (eps=3e-3, relative_mutation=true, search_mlp=true, "
                             "strategy=cmaes), quant.NAME=VALUE for the QuantConfig (quant.fit_on=all, "
                             "quant.bias_correction=false) or strategy.NAME=VALUE for the strategy's options "
                             "(strategy.popsize=5)")
    parser.add_argument("--curve", type=int, default=0, metavar="N",
                        help="also record the test top-1 at about N points along the search (after every "
                             "visits/N-th block visit), for the gap-recovered-against-evaluations plot, and the "
                             "held-out scores at the same points (heldout_curve; with --heldout-only too)")
    parser.add_argument("--out", default="benchmarks/accuracy.json")
    parser.add_argument("--heldout-only", action="store_true",
                        help="read no test image: report held-out top-1 only (to explore settings before committing "
                             "a pre-registration); needs --heldout-size")
    parser.add_argument("--hold-test", action="store_true",
                        help="measure the test top-1 but print held-out numbers only, so that a pick on held-out "
                             "images is made before any test number is seen; --report prints them afterwards")
    parser.add_argument("--report", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args(argv)
    if args.report:
        if not Path(args.out).is_file():
            raise SystemExit(f"--report: {args.out} does not exist; run the benchmark first or pass --out FILE")
        report(json.loads(Path(args.out).read_text()))
        return
    for flag, given in (("--heldout-only", args.heldout_only), ("--hold-test", args.hold_test)):
        if given and args.heldout_size <= 0:
            parser.error(f"{flag} needs held-out images: give --heldout-size N (e.g. 5000)")
    if not args.checkpoints:
        parser.error("--checkpoints is required (e.g. checkpoints/levit_fmnist.pth), unless --report")
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    if out.is_file():  # resumable: rows already measured with the same settings are kept
        rows = json.loads(out.read_text())
    module_overrides(args.set)  # a malformed --set fails before any work
    done = {(r["checkpoint"], r["w_bits"], r["a_bits"], r["seed"], r["passes"], r["calib_size"],
             r.get("settings", "")) for r in rows}
    for pair in args.bits:  # settings outermost: a time-limited run finishes whole rows, both models
        w_bits, a_bits = (int(v) for v in pair.split(":"))
        for ckpt in args.checkpoints:
            for seed in args.seeds:
                if (Path(ckpt).name, w_bits, a_bits, seed, args.passes, args.calib_size,
                        settings_key(args)) in done:
                    continue
                row = run_one(ckpt, w_bits, a_bits, seed, args)
                rows.append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1) + "\n")
                held = row["evolq"] is None or args.hold_test
                scores = row["heldout"] if held else row
                print(f"{row['checkpoint']} W{w_bits}A{a_bits} seed {seed}: "
                      + ("held-out " if held else f"FP {row['fp']['top1']:.2f} ")
                      + f"baseline {scores['baseline']['top1']:.2f} Evol-Q {scores['evolq']['top1']:.2f} "
                      f"({row['search_s']:.0f} s search)", flush=True)
    if args.hold_test:
        print(f"test numbers held back: read them after the pick with --report --out {out}")
        return
    report(rows)


def report(rows: list[dict[str, Any]]) -> None:
    explored = [r for r in rows if r["evolq"] is None]
    if explored:  # held-out-only rows: no test number exists to tabulate
        print("held-out only (no test image read):")
        for r in explored:
            h = r["heldout"]
            print(f"  {r['checkpoint']} W{r['w_bits']}A{r['a_bits']} seed {r['seed']} {r['passes']} passes "
                  f"{r.get('settings', '')}: " + (f"FP {h['fp']['top1']:.2f}, " if "fp" in h else "")
                  + f"{h['baseline']['top1']:.2f} -> {h['evolq']['top1']:.2f}")
        rows = [r for r in rows if r["evolq"] is not None]
        if not rows:
            return
    print(table(rows))
    chosen = selection(rows)
    if chosen:
        print("\nChosen on held-out train images (never the test set):\n\n" + chosen)


if __name__ == "__main__":
    main()
