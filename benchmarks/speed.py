"""Seconds per candidate of the Evol-Q search, next to its floor and to the original's naive loop.

For each model, calibration-set size, precision and visited block ``i`` it times, interleaved and side by side:

1. ``candidate``: what the search's ``SuffixEvaluator`` does per child: write the mutated scales into block ``i``'s layers, run
   ``forward_from(i, cached_input)`` on every calibration batch and score infoNCE against cached teacher logits
   (``generation`` is also timed whole: tournament, mutation, evaluation, writing the best scales back);
2. ``floor``: timm's own FP blocks ``i..``, final norm and head on the same cached inputs (quantization off);
3. ``naive``: the original's loop: the whole quantized model from the images, every weight re-quantized on every
   forward (our weight cache off), scored against the same teacher. It costs a whole model per sample whatever the
   position, so ``--naive-repeats`` can time it less often than the rest, or (0) not at all.

Before timing, each position checks bits: a probe candidate must score the same through the cached-input suffix as
through the whole model, and one shared probe the same under every ``--ops`` path (on a GPU this is where the
compiled kernels are checked against eager ones). Timings are medians over ``--repeats``; peak memory is CUDA ``max_memory_allocated`` on a GPU and the process's
peak RSS (VmHWM, reset before each call) on CPU. Random timm weights and random images are enough for timing.
Example (CPU, a few positions)::

    python -m benchmarks.speed --device cpu --models deit_tiny --calib-sizes 256 --blocks 0,6,11 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from evolq_pl.fitness import FitnessAccumulator, get_fitness
from evolq_pl.models import PAPER_MODELS, create_fp_model, quantize_model
from evolq_pl.quant import functional as QF
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.fused import fused_kernels
from evolq_pl.quant.layers import weight_cache_disabled
from evolq_pl.quant.modes import calibrate
from evolq_pl.search.evaluator import fp_teachers, suffix_fitness
from evolq_pl.search.evolution import Population, generation, mutate
from evolq_pl.search.scales import ScaleVector
from evolq_pl.search.schedule import SearchConfig

PRECISIONS = ("32-true", "bf16-mixed")
OPS = ("fast", "reference", "fused")
TARGET_FLOOR_RATIO = 1.3  # candidate / floor, at most
TARGET_NAIVE_RATIO = 3.0  # naive / candidate averaged over the blocks of a 12-block model, at least


# -- devices, precision, memory ---------------------------------------------------------------------------------

def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context Lightning runs ``training_step`` in for this precision."""
    if precision == "32-true":
        return nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: choose {' or '.join(PRECISIONS)}")


@contextmanager
def ops_mode(ops: str) -> Iterator[None]:
    """``reference``: the quantizer formulas out of place, as before the in-place inference path (the 'before');
    ``fused``: the in-place path with each quantizer and integer LayerNorm as one compiled kernel."""
    if ops == "fast":
        yield
    elif ops == "fused":
        with fused_kernels():
            yield
    elif ops == "reference":
        with QF.reference_ops():
            yield
    else:
        raise ValueError(f"ops {ops!r}: choose {' or '.join(OPS)}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one call: CUDA max_memory_allocated, else the peak RSS (resettable through /proc on Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated"
        self._proc = False
        if device.type != "cuda":
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._proc = "VmHWM" in Path("/proc/self/status").read_text()
            except OSError:
                self._proc = False
            self.kind = "rss_peak_per_call" if self._proc else "rss_peak_since_start"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._proc:
            Path("/proc/self/clear_refs").write_text("5")

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._proc:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": str(device),
                            # the vector ISA the CPU kernels dispatch to: float sums, and so a search, differ across it
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


# -- one model ----------------------------------------------------------------------------------------------------

def fp_suffix(fp: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The floor: timm's own blocks from ``index`` on, final norm and head (fused attention, no quantizers)."""
    if isinstance(fp, SwinTransformer):
        return swin_fp_suffix(fp, index, hidden)
    if not hasattr(fp, "patch_embed"):
        return fp_cnn_suffix(fp, index, hidden)
    x = hidden
    for block in fp.blocks[index:]:
        x = block(x)
    return fp.forward_head(fp.norm(x))


def swin_fp_suffix(fp: SwinTransformer, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The Swin floor: blocks from ``index`` on over all stages, each later stage's patch merging before its first
    block (``hidden`` is past the merging of block ``index``, as the quantized suffix's input)."""
    x, i = hidden, 0
    for stage in fp.layers:
        for j, block in enumerate(stage.blocks):
            if i >= index:
                if j == 0 and i > index:
                    x = stage.downsample(x)
                x = block(x)
            i += 1
    return fp.forward_head(fp.norm(x))


def fp_cnn_suffix(fp: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The floor of a CNN (timm ResNet or EfficientNet, BatchNorm unfolded): its residual blocks from ``index`` on
    (QuantCNN's flat list), the head conv where there is one, pooling and classifier."""
    if hasattr(fp, "layer1"):
        blocks = [b for layer in (fp.layer1, fp.layer2, fp.layer3, fp.layer4) for b in layer]
        tail = nn.Identity()
    else:
        blocks = [b for stage in fp.blocks for b in stage]
        tail = nn.Sequential(fp.conv_head, fp.bn2)
    x = hidden
    for block in blocks[index:]:
        x = block(x)
    return fp.forward_head(tail(x))


def input_shape(fp: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the model's images: the ViT's patch embedding, else timm's pretrained config (CNNs)."""
    if hasattr(fp, "patch_embed"):
        return (fp.patch_embed.proj.in_channels, *fp.patch_embed.img_size)
    return tuple(fp.pretrained_cfg["input_size"])


class Timer:
    """Times calls side by side and keeps every sample and the peak memory per kind."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.memory = PeakMemory(device)
        self.samples: dict[str, list[float]] = {}
        self.peaks: dict[str, float] = {}

    def __call__(self, kind: str, fn: Callable[[], Any]) -> Any:
        sync(self.device)
        self.memory.reset()
        start = time.perf_counter()
        out = fn()
        sync(self.device)
        self.samples.setdefault(kind, []).append(time.perf_counter() - start)
        self.peaks[kind] = max(self.peaks.get(kind, 0.0), self.memory.read_mib())
        return out

    def median(self, kind: str) -> float:
        return statistics.median(self.samples[kind])


def parse_blocks(spec: str | None, depth: int) -> list[int]:
    if not spec:
        return list(range(depth))
    out = []
    for part in spec.split(","):
        i = int(part)
        i = i + depth if i < 0 else i
        if not 0 <= i < depth:
            raise ValueError(f"block {part} is outside 0..{depth - 1}")
        out.append(i)
    return sorted(set(out))


def spread_order(positions: list[int]) -> list[int]:
    """Measure first the positions farthest from those already measured (0, last, middle, ...), so a run that
    --budget-s cuts short still covers the depth."""
    left, order = sorted(positions), []
    while left:
        pick = max(left, key=lambda p: (min((abs(p - q) for q in order), default=1 << 30), -p))
        order.append(pick)
        left.remove(pick)
    return order


def estimate_all_blocks(rows: list[dict[str, Any]], depth: int, ops: str) -> dict[str, float] | None:
    """Mean ratios over every block position from a subset: candidate and floor times are linear in the number
    of blocks they run (fitted), the naive time does not depend on the position (median)."""
    if len(rows) < 2:
        return None
    remaining = np.array([depth - r["block"] for r in rows], dtype=float)
    cand = np.polyfit(remaining, [r["ops"][ops]["candidate_s"] for r in rows], 1)
    floor = np.polyfit(remaining, [r["floor_s"] for r in rows], 1)
    positions = np.arange(1, depth + 1, dtype=float)
    cand_all, floor_all = np.polyval(cand, positions), np.polyval(floor, positions)
    naive_s = [r["ops"][ops]["naive_s"] for r in rows if r["ops"][ops]["naive_s"] is not None]
    naive = float(np.mean(statistics.median(naive_s) / cand_all)) if naive_s else None
    return {"candidate_over_floor": float(np.mean(cand_all / floor_all)), "naive_over_candidate": naive}


@torch.no_grad()
def bench_model(name: str, n_images: int, args: argparse.Namespace, device: torch.device, runs: list[dict[str, Any]],
                save: Callable[[], None]) -> None:
    """Append one run per precision to ``runs``, calling ``save`` after every block (a cut-off run keeps its rows)."""
    timm_name = PAPER_MODELS.get(name, name)
    torch.manual_seed(args.seed)
    fp = create_fp_model(timm_name, pretrained=False).to(device).eval().requires_grad_(False)
    cfg = QuantConfig.from_preset("e2e", w_bits=args.w_bits, a_bits=args.a_bits)
    qmodel = quantize_model(fp, cfg, timm_name).to(device).eval().requires_grad_(False)
    depth = len(qmodel.blocks)
    chans, height, width = input_shape(fp)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(n_images, chans, height, width, generator=gen)
    batches = [b.to(device) for b in images.split(args.batch_size)]
    started = time.perf_counter()
    calibrate(qmodel, batches[: args.calib_batches])  # any calibration will do for timing
    calib_s = time.perf_counter() - started
    teacher = fp_teachers(qmodel, batches)  # fp32 like EvolQModule.on_fit_start (Lightning's autocast is off there)
    fitness_fn = get_fitness("infonce", 3.0)
    search = SearchConfig()
    blocks = qmodel.search_blocks()
    positions = parse_blocks(args.blocks, depth)
    for precision in args.precision:
        rows: list[dict[str, Any]] = []
        run = {"model": name, "timm_name": timm_name, "calib_images": n_images, "batch_size": args.batch_size,
               "num_batches": len(batches), "precision": precision, "depth": depth, "calibrate_s": calib_s,
               "truncated": False, "blocks": rows, "summary": {}}
        runs.append(run)
        deadline = time.perf_counter() + args.budget_s if args.budget_s > 0 else math.inf
        for i in spread_order(positions):
            if time.perf_counter() > deadline:
                run["truncated"] = True
                break
            rows.append(bench_block(i, qmodel, fp, blocks[i].layers, batches, teacher, fitness_fn, search,
                                    precision, args, device))
            print_row(rows[-1], args.ops)
            rows.sort(key=lambda r: r["block"])
            run["summary"] = summarize(rows, depth, args.ops)
            save()
        print_summary(run, args.ops)


def bench_block(i: int, qmodel: nn.Module, fp: nn.Module, layers: tuple, batches: list[torch.Tensor],
                teacher: list[torch.Tensor], fitness_fn: Callable, search: SearchConfig, precision: str,
                args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    timer = Timer(device)
    n_images = sum(len(b) for b in batches)
    def visit() -> list[torch.Tensor]:  # SuffixEvaluator.start_block, which runs in the training precision
        with autocast(precision, device):
            return [qmodel.forward_to(i, x) for x in batches]

    hidden = timer("visit", visit)
    scales = ScaleVector(layers)
    base = scales.get()
    eps = search.resolve_eps(layers[-1].weight_quantizer.bit_type.bits)

    def score(ops: str) -> float:
        with autocast(precision, device), ops_mode(ops):
            total, count = suffix_fitness(qmodel, i, hidden, teacher, fitness_fn, device)
            return float(total) / count

    def naive_score(candidate: torch.Tensor, ops: str) -> float:
        with autocast(precision, device), ops_mode(ops), weight_cache_disabled():
            scales.set(candidate)
            acc = FitnessAccumulator(device)
            for x, t in zip(batches, teacher, strict=True):
                acc.add(fitness_fn(qmodel(x), t))
            return acc.mean()

    state: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any] | None] = {}
    naive_repeats = args.repeats if args.naive_repeats is None else args.naive_repeats
    for k, ops in enumerate(args.ops):
        rng = np.random.default_rng(args.seed + 1000 * i + k)
        population = Population.from_initial(base, score(ops), search.population_size)
        state[ops] = {"rng": rng, "population": population}
        probe = mutate(base, eps, rng)  # warm-up: one candidate both ways, which must agree bitwise
        scales.set(probe)
        ours = score(ops)
        if naive_repeats:
            naive = naive_score(probe, ops)
            checks[ops] = {"candidate_fitness": ours, "naive_fitness": naive, "same": ours == naive}
        else:
            checks[ops] = None
        scales.set(base)
    shared = mutate(base, eps, np.random.default_rng(args.seed + 1000 * i + 999))  # one probe scored by every ops
    scales.set(shared)
    across = {ops: score(ops) for ops in args.ops}
    scales.set(base)
    with autocast(precision, device):
        fp_suffix(fp, i, hidden[0])

    def run_generation(ops: str) -> None:
        s = state[ops]

        def evaluate(candidate: torch.Tensor) -> float:  # SuffixEvaluator.evaluate
            start = time.perf_counter()
            scales.set(candidate)
            value = score(ops)
            timer.samples.setdefault(f"candidate:{ops}", []).append(time.perf_counter() - start)
            return value

        generation(s["population"], evaluate, eps, search.tournament_size, s["rng"], search.relative_mutation)
        scales.set(s["population"].best().scales)  # the model always holds the best individual

    def run_naive(ops: str) -> None:
        s = state[ops]
        naive_score(mutate(s["population"].best().scales, eps, s["rng"]), ops)
        scales.set(s["population"].best().scales)

    def run_floor() -> None:
        with autocast(precision, device):
            for h in hidden:
                fp_suffix(fp, i, h)

    kinds: list[tuple[str, Callable[[], None]]] = [("floor", run_floor)]
    for ops in args.ops:
        kinds.append((f"generation:{ops}", lambda ops=ops: run_generation(ops)))
        kinds.append((f"naive:{ops}", lambda ops=ops: run_naive(ops)))
    for r in range(args.repeats):  # rotate the order so drifting machine load hits every kind alike
        shift = r % len(kinds)
        for kind, fn in kinds[shift:] + kinds[:shift]:
            if not kind.startswith("naive:") or r < naive_repeats:
                timer(kind, fn)
    scales.set(base)
    row: dict[str, Any] = {"block": i, "visit_s": timer.median("visit"), "floor_s": timer.median("floor"),
                           "floor_img_per_s": n_images / timer.median("floor"),
                           "peak_mib_floor": timer.peaks["floor"], "peak_mib_visit": timer.peaks["visit"],
                           "memory": timer.memory.kind, "ops": {},
                           "probe_by_ops": across, "ops_agree": len(set(across.values())) == 1}
    for ops in args.ops:
        cand = timer.median(f"candidate:{ops}")
        naive = timer.median(f"naive:{ops}") if naive_repeats else None
        row["ops"][ops] = {
            "candidate_s": cand, "generation_s": timer.median(f"generation:{ops}"), "naive_s": naive,
            "candidate_img_per_s": n_images / cand, "naive_img_per_s": None if naive is None else n_images / naive,
            "candidate_over_floor": cand / row["floor_s"],
            "naive_over_candidate": None if naive is None else naive / cand,
            "peak_mib_candidate": timer.peaks[f"generation:{ops}"], "peak_mib_naive": timer.peaks.get(f"naive:{ops}"),
            "check": checks[ops],
            "samples": {k: timer.samples.get(f"{k}:{ops}", []) for k in ("candidate", "generation", "naive")},
        }
    row["floor_samples"] = timer.samples["floor"]
    return row


def summarize(rows: list[dict[str, Any]], depth: int, ops_list: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"blocks_measured": [r["block"] for r in rows], "all_blocks": len(rows) == depth}
    if not rows:
        return out
    for ops in ops_list:
        per = [r["ops"][ops] for r in rows]
        timed = [p for p in per if p["naive_s"] is not None]  # rows whose naive loop ran (--naive-repeats > 0)
        checked = [p["check"]["same"] for p in per if p["check"] is not None]
        s = {
            "mean_candidate_over_floor": statistics.mean(p["candidate_over_floor"] for p in per),
            "sum_candidate_over_sum_floor": sum(p["candidate_s"] for p in per) / sum(r["floor_s"] for r in rows),
            "mean_generation_s": statistics.mean(p["generation_s"] for p in per),
            "mean_candidate_s": statistics.mean(p["candidate_s"] for p in per),
            "peak_mib_candidate": max(p["peak_mib_candidate"] for p in per),
            "fitness_checks_equal": all(checked) if checked else None,
            "mean_naive_over_candidate": None, "sum_naive_over_sum_candidate": None, "mean_naive_s": None,
            "peak_mib_naive": None,
        }
        if timed:
            s["mean_naive_over_candidate"] = statistics.mean(p["naive_over_candidate"] for p in timed)
            s["sum_naive_over_sum_candidate"] = sum(p["naive_s"] for p in timed) / sum(p["candidate_s"] for p in timed)
            s["mean_naive_s"] = statistics.mean(p["naive_s"] for p in timed)
            s["peak_mib_naive"] = max(p["peak_mib_naive"] for p in timed)
        if len(rows) < depth:
            s["estimated_all_blocks"] = estimate_all_blocks(rows, depth, ops)
        out[ops] = s
    out["ops_agree"] = all(r["ops_agree"] for r in rows)  # every ops path scored the shared probe bitwise alike
    if "fast" in ops_list and "reference" in ops_list:
        out["reference_over_fast_candidate"] = statistics.mean(
            r["ops"]["reference"]["candidate_s"] / r["ops"]["fast"]["candidate_s"] for r in rows)
    if "fast" in ops_list and "fused" in ops_list:
        out["fast_over_fused_candidate"] = statistics.mean(
            r["ops"]["fast"]["candidate_s"] / r["ops"]["fused"]["candidate_s"] for r in rows)
    out["peak_mib_floor"] = max(r["peak_mib_floor"] for r in rows)
    return out


# -- printing -----------------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str) -> str:
    """A number, or '-' where it was not measured (the naive loop under --naive-repeats 0)."""
    return "-" if value is None else format(value, spec)


def print_row(row: dict[str, Any], ops_list: list[str]) -> None:
    for ops in ops_list:
        p = row["ops"][ops]
        print(f"  block {row['block']:2d} [{ops:9s}] visit {row['visit_s']:7.3f}s  candidate {p['candidate_s']:7.3f}s"
              f"  generation {p['generation_s']:7.3f}s  floor {row['floor_s']:7.3f}s  naive {fmt(p['naive_s'], '7.3f')}s"
              f"  cand/floor {p['candidate_over_floor']:5.2f}  naive/cand {fmt(p['naive_over_candidate'], '5.2f')}"
              f"  img/s {p['candidate_img_per_s']:8.1f}/{row['floor_img_per_s']:8.1f}/{fmt(p['naive_img_per_s'], '8.1f')}"
              f"  peak MiB {p['peak_mib_candidate']:.0f}/{row['peak_mib_floor']:.0f}/{fmt(p['peak_mib_naive'], '.0f')}",
              flush=True)


def print_summary(run: dict[str, Any], ops_list: list[str]) -> None:
    s = run["summary"]
    if not s:
        print(f"== {run['model']} {run['precision']}: no block measured")
        return
    head = (f"== {run['model']} ({run['timm_name']}), {run['calib_images']} images in {run['num_batches']} batches, "
            f"{run['precision']}, blocks {s['blocks_measured']}{' (truncated by --budget-s)' if run['truncated'] else ''}")
    print(head)
    for ops in ops_list:
        if ops not in s:
            continue
        o = s[ops]
        floor_ok = "meets" if o["mean_candidate_over_floor"] <= TARGET_FLOOR_RATIO else "misses"
        naive = o["mean_naive_over_candidate"]
        naive_ok = "not timed" if naive is None else "meets" if naive >= TARGET_NAIVE_RATIO else "misses"
        print(f"   [{ops}] candidate/floor mean {o['mean_candidate_over_floor']:.2f} ({floor_ok} <= "
              f"{TARGET_FLOOR_RATIO}), naive/candidate mean {fmt(naive, '.2f')} ({naive_ok} >= "
              f"{TARGET_NAIVE_RATIO}), s/generation mean {o['mean_generation_s']:.3f}, "
              f"candidate and naive score a probe alike: {fmt(o['fitness_checks_equal'], '')}")
        est = o.get("estimated_all_blocks")
        if est:
            print(f"   [{ops}] estimated over all {run['depth']} positions (fit to the measured ones): "
                  f"candidate/floor {est['candidate_over_floor']:.2f}, "
                  f"naive/candidate {fmt(est['naive_over_candidate'], '.2f')}")
    if "reference_over_fast_candidate" in s:
        print(f"   reference ops / fast ops per candidate: {s['reference_over_fast_candidate']:.2f}x")
    if "fast_over_fused_candidate" in s:
        print(f"   fast ops / fused ops per candidate: {s['fast_over_fused_candidate']:.2f}x")
    if len(ops_list) > 1:
        print(f"   {', '.join(ops_list)} score a shared probe bitwise alike: {s['ops_agree']}")


# -- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", default=["32-true"], choices=PRECISIONS)
    p.add_argument("--models", nargs="+", default=["deit_tiny"],
                   help="paper keys (deit_tiny, vit_base, ...) or timm names; random weights")
    p.add_argument("--calib-sizes", nargs="+", type=int, default=[256])
    p.add_argument("--blocks", default=None, help="comma-separated block positions (negative from the end); all")
    p.add_argument("--batch-size", type=int, default=100, help="calibration batch size (Evol-Q: 100)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-repeats", type=int, default=None,
                   help="time the naive loop in only the first N repeats (default: all); 0 skips it and its probe "
                        "check, for large models on a CPU where it costs a whole model per sample")
    p.add_argument("--ops", nargs="+", default=["fast"], choices=OPS,
                   help="fast: the in-place inference path; reference: the out-of-place formulas (before/after); "
                        "fused: fast with compiled one-pass quantizer kernels (evolq_pl.quant.fused)")
    p.add_argument("--calib-batches", type=int, default=1, help="batches the quantizers are calibrated on")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="per model, size and precision: start no new block position after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every number as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.calib_batches < 1:
        p.error("--repeats, --batch-size and --calib-batches must be >= 1")
    if args.naive_repeats is not None and not 0 <= args.naive_repeats <= args.repeats:
        p.error(f"--naive-repeats must be between 0 and --repeats ({args.repeats})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine(device)
    print(f"machine: {info}", flush=True)
    result = {"command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": info, "args": vars(args), "runs": []}

    def save() -> None:
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")

    for name in args.models:
        for n in args.calib_sizes:
            bench_model(name, n, args, device, result["runs"], save)
    save()
    if args.out:
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
