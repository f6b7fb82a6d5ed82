"""Where a calibrated model's error comes from: test top-1 with only some parts quantized.

    python -m benchmarks.gap_attribution --checkpoints checkpoints/vit12s_fmnist.pth checkpoints/levit_fmnist.pth \
        --bits 3:8 2:8 --seeds 0 1 2 --out benchmarks/results/gap_attribution_cpu.json

Evol-Q searches the weight scales of some layers only (qkv and proj by default). When most of the FP gap comes from
activation quantizers, the integer LayerNorm or the other layers' weights, no such search can close it; this
measures that split on the calibrated baseline (the search is not run). Nothing is selected on the test set: these are readings of fixed models.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy import compare, load_reference, test_logits
from evolq_pl.data import DEFAULT_FASHION_MNIST_ROOT
from evolq_pl.quant.modes import calibrate, quantized_parts

# name -> which parts stay quantized (weights, activations, integer LayerNorm, only the searched layers' weights)
PARTS = {
    "all": (True, True, True, False),
    "weights only": (True, False, False, False),
    "searched weights only": (True, False, False, True),
    "activations + int LN": (False, True, True, False),
    "activations only": (False, True, False, False),
    "all but int LN": (True, True, False, False),
}


def run_one(ckpt: str, w_bits: int, a_bits: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    module, data = load_reference(ckpt, w_bits, a_bits, seed, args)
    fp_logits, labels = test_logits(module, data.test_dataloader(), device, fp=True)
    calibrate(module.qmodel, data.calib_dataloader(), fit_on=module.qconfig.fit_on, device=device)
    parts = {}
    searched = [layer for block in module.blocks for layer in block.layers]  # what Evol-Q tunes
    for name, (weights, acts, int_norm, only_searched) in PARTS.items():
        with quantized_parts(module.qmodel, weights=weights, activations=acts, int_norm=int_norm,
                             only_layers=searched if only_searched else None):
            parts[name] = compare(test_logits(module, data.test_dataloader(), device)[0], fp_logits, labels)
    return {"checkpoint": Path(ckpt).name, "w_bits": w_bits, "a_bits": a_bits, "seed": seed,
            "calib_size": args.calib_size, "fp": compare(fp_logits, fp_logits, labels), "parts": parts}


def table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["w_bits"], r["a_bits"]), []).append(r)
    names = list(PARTS)
    out = ["| model | W/A | seeds | FP | " + " | ".join(f"{n} (top-1, share of gap)" for n in names) + " |",
           "|---|---|---|---|" + "---|" * len(names)]
    for (ckpt, w, a), rs in groups.items():
        fp = statistics.mean(r["fp"]["top1"] for r in rs)
        gap = fp - statistics.mean(r["parts"]["all"]["top1"] for r in rs)
        cells = []
        for n in names:
            top1 = statistics.mean(r["parts"][n]["top1"] for r in rs)
            share = f"{(fp - top1) / gap:.0%}" if gap > 0 else "n/a"
            cells.append(f"{top1:.2f} ({share})")
        out.append(f"| {ckpt} | W{w}A{a} | {len(rs)} | {fp:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", help="reference model files (with meta)")
    parser.add_argument("--bits", nargs="+", default=["3:8"], help="W:A pairs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT)
    parser.add_argument("--out", default="benchmarks/gap_attribution.json")
    parser.add_argument("--report", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        if not out.is_file():
            raise SystemExit(f"--report: {out} does not exist; run the benchmark first or pass --out FILE")
        print(table(json.loads(out.read_text())))
        return
    if not args.checkpoints:
        parser.error("--checkpoints is required (e.g. checkpoints/levit_fmnist.pth), unless --report")
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["checkpoint"], r["w_bits"], r["a_bits"], r["seed"], r["calib_size"]) for r in rows}
    for pair in args.bits:
        w_bits, a_bits = (int(v) for v in pair.split(":"))
        for ckpt in args.checkpoints:
            for seed in args.seeds:
                if (Path(ckpt).name, w_bits, a_bits, seed, args.calib_size) in done:
                    continue
                rows.append(run_one(ckpt, w_bits, a_bits, seed, args))
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1) + "\n")
                parts = rows[-1]["parts"]
                print(f"{Path(ckpt).name} W{w_bits}A{a_bits} seed {seed}: "
                      + ", ".join(f"{n} {p['top1']:.2f}" for n, p in parts.items()), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
