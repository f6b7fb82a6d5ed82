"""What one straight-through gradient costs in fitness evaluations: the figure behind ``GRADIENT_COST``.

    python -m benchmarks.gradient_cost --checkpoints checkpoints/vit12s_fmnist.pth checkpoints/levit_fmnist.pth \
        --bits 2:8 --repeats 5 --out benchmarks/results/gradient_cost_cpu.json

Per shipped reference and search block (the first, a middle and the last: the suffix a candidate runs through is
longest at the first), it times ``SuffixEvaluator.evaluate`` and ``SuffixEvaluator.gradient`` on the full calibration
set alternately, ``--repeats`` times each, in one process (so a shared machine slows both alike), and reports the
median ratio gradient / evaluation per block and over the measured blocks together (summed medians, as a pass
spends it). The calibration images are drawn from the train split; no test image is read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.accuracy import load_reference
from evolq_pl.data import DEFAULT_FASHION_MNIST_ROOT, calibration_batches
from evolq_pl.quant.modes import calibrate
from evolq_pl.search.evaluator import SuffixEvaluator, fp_teachers


def measure(ckpt: str, w_bits: int, a_bits: int, args: argparse.Namespace) -> list[dict]:
    module, data = load_reference(ckpt, w_bits, a_bits, 0, args, fitness="kl")
    device = torch.device(args.device)
    batches = [x.to(device) for x in calibration_batches(data)]
    calibrate(module.qmodel, batches, fit_on=module.qconfig.fit_on, device=device)
    evaluator = SuffixEvaluator(module.qmodel, module.blocks, batches, fp_teachers(module.qmodel, batches),
                                module.fitness_fn, device)
    rows = []
    last = len(module.blocks) - 1
    for block in sorted({0, last // 2, last}):
        evaluator.start_block(block)
        scales = evaluator.get(block)
        evaluator.gradient(block, scales)  # warm-up: first-call allocations
        evaluator.evaluate(block, scales)
        times: dict[str, list[float]] = {"evaluate": [], "gradient": []}
        for _ in range(args.repeats):
            for name, call in (("evaluate", evaluator.evaluate), ("gradient", evaluator.gradient)):
                started = time.perf_counter()
                call(block, scales)
                times[name].append(time.perf_counter() - started)
        evaluator.end_block(block)
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"checkpoint": Path(ckpt).name, "w_bits": w_bits, "block": block, "blocks": last + 1,
                     "evaluate_s": times["evaluate"], "gradient_s": times["gradient"],
                     "ratio": medians["gradient"] / medians["evaluate"]})
        print(f"{Path(ckpt).name} W{w_bits}A{a_bits} block {block}/{last}: evaluation {medians['evaluate']:.3f} s, "
              f"gradient {medians['gradient']:.3f} s, ratio {rows[-1]['ratio']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--bits", default="2:8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_ROOT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    w_bits, a_bits = (int(v) for v in args.bits.split(":"))
    rows = [row for ckpt in args.checkpoints for row in measure(ckpt, w_bits, a_bits, args)]
    for ckpt in args.checkpoints:  # a pass visits every block: its cost is the ratio of the summed medians
        mine = [r for r in rows if r["checkpoint"] == Path(ckpt).name]
        weighted = (sum(statistics.median(r["gradient_s"]) for r in mine)
                    / sum(statistics.median(r["evaluate_s"]) for r in mine))
        print(f"{Path(ckpt).name}: ratio per block {min(r['ratio'] for r in mine):.2f}-"
              f"{max(r['ratio'] for r in mine):.2f}, over the measured blocks together {weighted:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "cpu_capability":
                                              torch.backends.cpu.get_cpu_capability(),
                                              "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
