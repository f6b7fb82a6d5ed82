"""Seconds per candidate: ``SuffixEvaluator.evaluate_many`` (candidates stacked along the batch) against one
``evaluate`` after another, on the same cached block inputs, interleaved, medians.

Random timm weights and random images are enough for timing (DeiT-Tiny shapes by default). Before timing, the two
ways must give the same fitness for every candidate (bitwise is checked and recorded). Example::

    python -m benchmarks.batched_speed --device cpu --images 32 --batch-size 16 --candidates 8 --repeats 5 \
        --out benchmarks/results/batched_speed_cpu_deit_tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.speed import machine, sync
from evolq_pl.fitness import get_fitness
from evolq_pl.models import PAPER_MODELS, create_fp_model, quantize_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate
from evolq_pl.search.evaluator import SuffixEvaluator, fp_teachers
from evolq_pl.search.evolution import mutate


def build(args: argparse.Namespace, device: torch.device) -> SuffixEvaluator:
    """The quantized model, calibrated on random images, as the search's evaluator with cached teacher logits."""
    timm_name = PAPER_MODELS.get(args.model, args.model)
    torch.manual_seed(args.seed)
    fp = create_fp_model(timm_name, pretrained=False).to(device).eval().requires_grad_(False)
    qmodel = quantize_model(fp, QuantConfig.from_preset("e2e", w_bits=args.w_bits, a_bits=8), timm_name)
    qmodel = qmodel.to(device).eval().requires_grad_(False)
    chans, (height, width) = fp.patch_embed.proj.in_channels, fp.patch_embed.img_size
    images = torch.randn(args.images, chans, height, width, generator=torch.Generator().manual_seed(args.seed))
    batches = [b.to(device) for b in images.split(args.batch_size)]
    calibrate(qmodel, batches)
    return SuffixEvaluator(qmodel, qmodel.search_blocks(), batches, fp_teachers(qmodel, batches),
                           get_fitness("infonce"), device,
                           stack=args.candidates)


def timed(fn, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def bench_block(ev: SuffixEvaluator, block: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    ev.start_block(block)
    rng = np.random.default_rng(block)
    base = ev.get(block)
    cands = [mutate(base, 1e-3, rng) for _ in range(args.candidates)]
    one = [ev.evaluate(block, c) for c in cands]
    many = ev.evaluate_many(block, cands)
    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    for rep in range(args.repeats):  # interleaved, the order alternating, so drift hits both alike
        order = ["one_by_one", "batched"] if rep % 2 == 0 else ["batched", "one_by_one"]
        for mode in order:
            if mode == "one_by_one":
                times[mode].append(timed(lambda: [ev.evaluate(block, c) for c in cands], device))
            else:
                times[mode].append(timed(lambda: ev.evaluate_many(block, cands), device))
    ev.apply(block, base)
    ev.end_block(block)
    per = {m: statistics.median(t) / args.candidates for m, t in times.items()}
    return {"block": block, "candidates": args.candidates, "bitwise_equal": one == many,
            "max_abs_diff": max(abs(a - b) for a, b in zip(one, many, strict=True)),
            "seconds_per_candidate": per, "ratio_one_by_one_over_batched": per["one_by_one"] / per["batched"],
            "raw_seconds": times}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=32, help="calibration images (random)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8, help="candidates per generation, all in one pass")
    parser.add_argument("--blocks", default="0,6,11", help="visited block indices")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--w-bits", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="recorded with the run, e.g. that the machine was shared")
    parser.add_argument("--out", default="benchmarks/results/batched_speed.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ev = build(args, device)
    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        rows.append(bench_block(ev, block, args, device))
        r = rows[-1]
        print(f"block {block}: {r['seconds_per_candidate']['one_by_one'] * 1e3:.1f} ms one by one, "
              f"{r['seconds_per_candidate']['batched'] * 1e3:.1f} ms batched per candidate "
              f"(x{r['ratio_one_by_one_over_batched']:.2f}); bitwise equal: {r['bitwise_equal']}", flush=True)
    result = {"args": vars(args), "machine": machine(device), "rows": rows,
              "median_ratio": statistics.median(r["ratio_one_by_one_over_batched"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
