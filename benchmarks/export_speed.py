"""Speed of the W8A8 export vs the FP32 export of the same model in ONNX Runtime on CPU (run it alone on the machine).

    python -m benchmarks.export_speed --models vit12s levit deit_base vit_base \
        --out benchmarks/results/export_speed_cpu.json

Per model: the W8A8 ONNX export (integer weights, Q/DQ activations, the e2e recipe) and the FP32 ONNX export of the
same model (the same graph writer with quantization off), each in an ONNX Runtime session with its default (full)
graph optimization. Latency is one image per run (batch 1), throughput ``--batch`` images per run; the two models run
interleaved, alternating which goes first, after ``--warmup`` runs each, and the medians are reported. Each row
records the machine (CPU model, cores, vector ISA), the thread count and the ONNX Runtime version, and which integer
kernels ONNX Runtime's optimizer put in each graph.

``vit12s`` / ``levit`` are the shipped Fashion-MNIST references (calibrated on demo images; a search changes scales,
not speed). ``deit_base`` / ``vit_base`` are the ImageNet shapes at 224 px with random weights (speed needs no real
weights), calibrated on a few random images with min-max observers. ``tiny`` is a 2-block toy to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

from evolq_pl.data import DemoDataModule
from evolq_pl.export import build_onnx
from evolq_pl.export.registry import quantized_mode
from evolq_pl.export.runtime import integer_kernels, optimized_ops, session
from evolq_pl.models import create_quantized_model, quantize_model
from evolq_pl.models.base import QuantizedModel
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate
from evolq_pl.testing import unit_gain_vit

ROOT = Path(__file__).resolve().parents[1]

REFERENCES = {"vit12s": "checkpoints/vit12s_fmnist.pth", "levit": "checkpoints/levit_fmnist.pth"}
RANDOM = {"deit_base": "deit_base_patch16_224", "vit_base": "vit_base_patch16_224"}


def build(name: str) -> tuple[QuantizedModel, tuple[int, ...]]:
    """A calibrated W8A8 model and its input shape (C, H, W)."""
    if name in REFERENCES:
        meta = torch.load(ROOT / REFERENCES[name], map_location="cpu", weights_only=True)["meta"]
        qmodel = create_quantized_model(meta["timm_name"], QuantConfig(w_bits=8, a_bits=8), pretrained=False,
                                        checkpoint_path=str(ROOT / REFERENCES[name]))
        data = DemoDataModule(calib_size=200, heldout_size=0, batch_size=100, image_size=meta["image_size"])
        calibrate(qmodel.eval(), data.calib_dataloader())
        return qmodel, tuple(next(iter(data.calib_dataloader()))[0].shape[1:])
    cfg = QuantConfig(w_bits=8, a_bits=8, act_observer="minmax")  # the observer changes scales, not speed
    if name in RANDOM:
        fp = timm.create_model(RANDOM[name], pretrained=False).eval()
        shape = (3, 224, 224)
    elif name == "tiny":
        fp, shape = unit_gain_vit(depth=2), (3, 32, 32)
    else:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join([*REFERENCES, *RANDOM, 'tiny'])}")
    qmodel = quantize_model(fp, cfg, RANDOM.get(name, "deit_tiny_patch16_224")).eval()
    images = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    calibrate(qmodel, [images[:2], images[2:]])
    return qmodel, shape


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed_runs(sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per run of each session on ``x``, interleaved, alternating which session goes first."""
    names = list(sessions)
    feeds = {n: {sessions[n].get_inputs()[0].name: x} for n in names}
    for n in names:
        for _ in range(warmup):
            sessions[n].run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for n in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append(time.perf_counter() - start)
    return times


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    qmodel, shape = build(name)
    with tempfile.TemporaryDirectory() as tmp:
        paths, kernels, sizes = {}, {}, {}
        for variant, quantized in (("w8a8", True), ("fp32", False)):
            with quantized_mode(qmodel):
                proto, _ = build_onnx(qmodel, shape, quantized=quantized)
            paths[variant] = Path(tmp) / f"{variant}.onnx"
            onnx.save(proto, str(paths[variant]))
            sizes[variant] = paths[variant].stat().st_size
            ops = optimized_ops(paths[variant], args.threads)
            kernels[variant] = {"integer_kernels": integer_kernels(ops), "ops": ops}
        results: dict[str, Any] = {}
        sessions = {v: session(p, args.threads) for v, p in paths.items()} if not args.kernels_only else {}
        rng = np.random.default_rng(0)
        for label, batch, runs in (("latency_batch1", 1, args.repeats), (f"throughput_batch{args.batch}", args.batch,
                                                                          args.batch_repeats)):
            if args.kernels_only:
                break
            x = rng.standard_normal((batch, *shape)).astype(np.float32)
            times = timed_runs(sessions, x, runs, args.warmup)
            results[label] = {v: {"median_s": statistics.median(t), "min_s": min(t), "runs": len(t),
                                  "images_per_s": batch / statistics.median(t)} for v, t in times.items()}
            results[label]["fp32_over_w8a8"] = results[label]["fp32"]["median_s"] / results[label]["w8a8"]["median_s"]
    return {"model": name, "input_shape": list(shape), "batch": args.batch, "threads": args.threads,
            "onnxruntime": ort.__version__, "cpu": cpu_name(), "logical_cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "model_onnx_bytes": sizes, "ort_graph": kernels, **results}


def kernel_table(rows: list[dict[str, Any]]) -> str:
    """What ONNX Runtime's optimizer made of each W8A8 graph (no timing)."""
    out = ["| model | input | W8A8 integer kernels | W8A8 MatMul/Gemm/Conv left in float | model.onnx W8A8 / FP32 |",
           "|---|---|---|---|---|"]
    for r in rows:
        ops = r["ort_graph"]["w8a8"]["ops"]
        kernels = ", ".join(f"{k} {v}" for k, v in r["ort_graph"]["w8a8"]["integer_kernels"].items()) or "none"
        floats = ", ".join(f"{k} {v}" for k, v in ops.items() if k in ("MatMul", "Gemm", "Conv", "FusedMatMul"))
        sizes = r["model_onnx_bytes"]
        out.append(f"| {r['model']} | {r['input_shape']} | {kernels} | {floats or 'none'} | "
                   f"{sizes['w8a8'] / 2**20:.1f} / {sizes['fp32'] / 2**20:.1f} MiB |")
    return "\n".join(out)


def table(rows: list[dict[str, Any]]) -> str:
    rows = [r for r in rows if "latency_batch1" in r]
    out = ["| model | threads | batch 1 latency FP32 → W8A8 (ms) | FP32/W8A8 | batch B throughput FP32 → W8A8 (img/s) | "
           "FP32/W8A8 | W8A8 integer kernels (ORT) | CPU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_batch1"]
        thr = r[f"throughput_batch{r['batch']}"]
        kernels = ", ".join(f"{k} {v}" for k, v in r["ort_graph"]["w8a8"]["integer_kernels"].items()) or "none"
        out.append(f"| {r['model']} | {r['threads']} | {1e3 * lat['fp32']['median_s']:.2f} → "
                   f"{1e3 * lat['w8a8']['median_s']:.2f} | {lat['fp32_over_w8a8']:.2f} | B={r['batch']}: "
                   f"{thr['fp32']['images_per_s']:.1f} → {thr['w8a8']['images_per_s']:.1f} | "
                   f"{thr['fp32_over_w8a8']:.2f} | {kernels} | {r['cpu']} ({r['cpu_capability']}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit12s", "levit", "deit_base", "vit_base"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch", type=int, default=64, help="images per run for the throughput figure")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model at batch 1")
    parser.add_argument("--batch-repeats", type=int, default=10, help="timed runs per model at --batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/export_speed_cpu.json")
    parser.add_argument("--kernels-only", action="store_true",
                        help="record only which integer kernels ONNX Runtime chose (no timing)")
    parser.add_argument("--report", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    if not args.report:
        torch.set_num_threads(1)  # building and calibrating; the sessions use --threads
        for name in args.models:
            rows.append(measure(name, args))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows), kernel_table(rows), sep="\n\n")


if __name__ == "__main__":
    main()
