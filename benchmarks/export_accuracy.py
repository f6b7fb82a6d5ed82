"""Agreement of the ONNX export in ONNX Runtime with the project's own evaluation, on the 10k Fashion-MNIST test set.

    python -m benchmarks.export_accuracy --runs runs/export --out benchmarks/results/export_accuracy_cpu.json

Every ``<run>/<version>/checkpoints/last.ckpt`` under ``--runs`` (searched checkpoints of ``python cli.py fit``) is
rebuilt from its own hyperparameters, exported with ``evolq_pl.export`` (weights as integers, activations as Q/DQ
pairs), and evaluated on the test split three ways: by PyTorch (the project's fake-quantized model), by ONNX Runtime
with its default graph optimizations (integer kernels where it fuses Q/DQ pairs), and by ONNX Runtime running the
graph as written (Q/DQ in float). Per run: top-1 of each, top-1 agreement, max/mean |logit difference|, the integer
kernels ONNX Runtime chose, the weight sizes, and per op (``--ops``) how often an op fed the same input as in
PyTorch gives another output, measured on calibration images. Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper

from evolq_pl.data import FashionMNISTDataModule
from evolq_pl.export import build_onnx
from evolq_pl.export.emitters import Emitter
from evolq_pl.export.graph import Graph, float_input
from evolq_pl.export.registry import quantized_mode
from evolq_pl.export.runtime import logits as ort_logits
from evolq_pl.export.runtime import session
from evolq_pl.export.writer import MODEL_FILE, export_quantized
from evolq_pl.models.base import QuantizedModel
from evolq_pl.module import EvolQModule
from evolq_pl.quant.layers import QConv2d, QIntLayerNorm, QLinear, QSoftmax
from evolq_pl.quant.quantizer import FakeQuantizer
from evolq_pl.trainer import quantized_model_for

ROOT = Path(__file__).resolve().parents[1]


def load_run(ckpt: Path, data_root: str | None) -> tuple[EvolQModule, FashionMNISTDataModule]:
    """The module and Fashion-MNIST data a checkpoint was searched with (from its saved hyperparameters)."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    accepted = inspect.signature(FashionMNISTDataModule).parameters
    data_hparams = {k: v for k, v in (saved.get("datamodule_hyper_parameters") or {}).items() if k in accepted}
    if data_root:
        data_hparams["root"] = data_root
    return EvolQModule(**hparams), FashionMNISTDataModule(**data_hparams)


@torch.no_grad()
def torch_logits(model: QuantizedModel, loader) -> tuple[np.ndarray, np.ndarray]:
    out, labels = [], []
    for x, y in loader:
        out.append(model(x).float().numpy())
        labels.append(y.numpy())
    return np.concatenate(out), np.concatenate(labels)


def compare(out: np.ndarray, reference: np.ndarray, labels: np.ndarray, step: float) -> dict[str, float]:
    """Top-1 and agreement, logit differences, and for the images where the top-1 differs how close PyTorch's own
    top two logits were (in steps of the logit quantizer's grid: 1 is the closest two distinct logits can be)."""
    diff = np.abs(out - reference)
    top1, ref_top1 = 100 * float((out.argmax(1) == labels).mean()), 100 * float((reference.argmax(1) == labels).mean())
    differ = out.argmax(1) != reference.argmax(1)
    top2 = np.sort(reference[differ], axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0]) / step
    return {"top1": top1, "delta_top1": top1 - ref_top1, "agreement": 100 * float(1 - differ.mean()),
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit_diff_steps": float(diff.max() / step), "disagreeing_images": int(differ.sum()),
            "disagreeing_margin_steps_max": float(margins.max()) if differ.any() else None}


# -- per-op agreement: each op fed PyTorch's own input ---------------------------------------------------------------


def _op_kind(module: torch.nn.Module, weight_quantizers: set[int]) -> str | None:
    if isinstance(module, FakeQuantizer) and id(module) not in weight_quantizers:
        return "activation Q/DQ" if module.dim is None else "PTF Q/DQ (per channel)"
    if isinstance(module, QIntLayerNorm):
        return "integer LayerNorm" if module.use_int else "LayerNorm"
    if isinstance(module, QSoftmax):
        return f"softmax ({module.mode}) + its quantizer"
    if isinstance(module, QLinear):
        return "Linear (bias correction: exact)" if module.bias_correction else "Linear"
    if isinstance(module, QConv2d):
        return "Conv (bias correction: exact)" if module.bias_correction else "Conv"
    return None


@torch.no_grad()
def op_agreement(model: QuantizedModel, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per op kind: each op written alone into a graph by the exporter's own emitter, fed the input PyTorch gave it
    in one forward of ``images``, run in ONNX Runtime as written; its output compared with PyTorch's.

    Outputs on a grid (quantizers, integer LayerNorm, quantized softmax) report the share of elements one or more
    grid steps apart; float outputs (Linear, Conv) the largest difference relative to the output's range.
    """
    weight_qs = {id(m.weight_quantizer) for m in model.modules() if isinstance(m, QLinear | QConv2d)}
    calls: list[tuple[torch.nn.Module, str, tuple, dict, torch.Tensor]] = []
    pending: dict[int, tuple] = {}

    def before(module, args, kwargs):
        pending[id(module)] = (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))

    def after(module, args, kwargs, output):
        calls.append((module, kinds[id(module)], *pending.pop(id(module)), output.detach().clone()))

    kinds = {id(m): k for m in model.modules() if (k := _op_kind(m, weight_qs)) is not None}
    handles = []
    for m in model.modules():
        if id(m) in kinds:
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True))
    try:
        with quantized_mode(model):
            model(images)
            stats: dict[str, dict[str, float]] = {}
            for module, kind, args, kwargs, reference in calls:
                out = _run_alone(model, module, args, kwargs)
                _accumulate(stats.setdefault(kind, {}), module, out, reference.float().numpy())
    finally:
        for h in handles:
            h.remove()
    return {kind: _summary(s) for kind, s in stats.items()}


def _run_alone(model: QuantizedModel, module: torch.nn.Module, args: tuple, kwargs: dict) -> np.ndarray:
    graph = Graph()
    e = Emitter(graph, model)
    x = args[0].float()
    name = graph.name("x")
    extra = list(args[1:]) + list(kwargs.values())
    if isinstance(module, FakeQuantizer):
        out = e.quantize(name, module)
    elif isinstance(module, QIntLayerNorm):
        out = e.layer_norm(name, module, *(extra + [None, None])[:2])
    elif isinstance(module, QSoftmax):
        out = e.softmax(name, module, (extra + [None])[0])
    elif isinstance(module, QLinear):
        out = e.linear(name, module)
    else:
        out = e.conv(name, module)
    graph.op("Identity", [out], "y")
    graph.nodes[-1].output[0] = "y"
    proto = graph.model([float_input(name, list(x.shape))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return ort_logits(session(proto.SerializeToString(), optimize=False), x)


def _accumulate(stat: dict[str, float], module: torch.nn.Module, out: np.ndarray, reference: np.ndarray) -> None:
    diff = np.abs(out.astype(np.float64) - reference)
    stat["elements"] = stat.get("elements", 0) + reference.size
    stat["differing"] = stat.get("differing", 0) + int((diff > 0).sum())
    if isinstance(module, QLinear | QConv2d):
        stat["max_rel_diff"] = max(stat.get("max_rel_diff", 0.0), float(diff.max() / np.abs(reference).max()))
        return
    step = _grid_step(module)
    if step is not None:
        stat["max_steps"] = max(stat.get("max_steps", 0.0), float((diff / step).max()))


def _grid_step(module: torch.nn.Module) -> np.ndarray | float | None:
    """The grid step of an op's output (per-channel steps broadcast on the last or channel axis)."""
    q = module
    if isinstance(module, QSoftmax):
        q = module.quantizer
    if isinstance(q, FakeQuantizer):
        s = q.scale.detach().float().numpy()
        return float(s[0]) if q.dim is None else (s if q.dim == -1 else s.reshape(-1, 1, 1))
    return None  # integer LayerNorm: its output is on the next quantizer's grid, counted there


def _summary(stat: dict[str, float]) -> dict[str, float]:
    out = {"elements": stat["elements"], "differing_share": stat["differing"] / stat["elements"]}
    for key in ("max_steps", "max_rel_diff"):
        if key in stat:
            out[key] = stat[key]
    return out


# -- one run -----------------------------------------------------------------------------------------------------------


def _relative(path: Path) -> str:
    """A path as the rows record it: relative to the repository root where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def run_one(ckpt: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row: the checkpoint ``ckpt`` (recorded as ``name``) exported and evaluated three ways."""
    module, data = load_run(ckpt, args.data_root)
    data.test_batch_size = args.batch_size
    qmodel, _ = quantized_model_for(module, None, str(ckpt))
    source = f"searched checkpoint {name}"
    qmodel.eval()
    data.setup("test")
    calib = next(iter(data.calib_dataloader()))[0]
    test_loader = data.test_dataloader()
    if args.limit:
        test_loader = [b for i, b in zip(range(-(-args.limit // args.batch_size)), test_loader, strict=False)]
    reference, labels = torch_logits(qmodel, test_loader)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_quantized(qmodel, Path(tmp) / "export", calib, source)
        results = {}
        for mode, optimize in (("ort_optimized", True), ("ort_unoptimized", False)):
            sess = session(Path(tmp) / "export" / MODEL_FILE, optimize=optimize)
            out = np.concatenate([ort_logits(sess, x) for x, _ in test_loader])
            results[mode] = compare(out, reference, labels, float(qmodel.q_logits.scale))
    with quantized_mode(qmodel):
        fp32_bytes = len(build_onnx(qmodel, tuple(calib.shape[1:]), quantized=False)[0].SerializeToString())
    cfg = qmodel.qconfig
    row = {
        "checkpoint": name,
        "reference": Path(module.hparams.checkpoint_path).name, "model": module.hparams.model_name,
        "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "weight_signed": cfg.weight_signed, "seed": module.hparams.seed,
        "passes": module.hparams.num_passes, "source": source, "test_images": len(labels),
        "torch": {"top1": 100 * float((reference.argmax(1) == labels).mean())}, **results,
        "integer_kernels": report["ort_integer_kernels"], "weight_containers": report["weight_containers"],
        "op_forms": report["op_forms"], "sizes": report["sizes"] | {"fp32_model_onnx_bytes": fp32_bytes},
        "onnxruntime": report["onnxruntime"], "onnx": report["onnx"], "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
    }
    if args.ops:
        row["ops"] = op_agreement(qmodel, calib)
    return row


# -- tables --------------------------------------------------------------------------------------------------------


def _key(r: dict[str, Any]) -> tuple:
    return (r["reference"], -r["w_bits"], r["weight_signed"])


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | W/A | weights | PyTorch top-1 | ORT top-1 (Δ) | agreement (images apart; PyTorch's top-2 gap "
           "there, at most) | max / mean \\|Δ logit\\| (max in logit steps) | ORT, graph as written: Δ top-1, "
           "agreement | integer kernels (ORT) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=_key):
        o, u = r["ort_optimized"], r["ort_unoptimized"]
        kernels = ", ".join(f"{k} {v}" for k, v in r["integer_kernels"].items()) or "none"
        gap = o.get("disagreeing_margin_steps_max")
        apart = f"{o['disagreeing_images']}; {gap:.0f} steps" if gap is not None else "0"
        out.append(
            f"| {r['reference']} | W{r['w_bits']}A{r['a_bits']} | {'sym int' if r['weight_signed'] else 'asym uint'} "
            f"| {r['torch']['top1']:.2f} | {o['top1']:.2f} ({o['delta_top1']:+.2f}) | {o['agreement']:.2f}% ({apart}) | "
            f"{o['max_abs_logit_diff']:.3f} / {o['mean_abs_logit_diff']:.4f} ({o['max_abs_logit_diff_steps']:.0f}) | "
            f"{u['delta_top1']:+.2f}, {u['agreement']:.2f}% | {kernels} |")
    return "\n".join(out)


def size_table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | W | quantized weights FP32 | packed (record) | in model.onnx | scales, zero points, gains, "
           "offsets | model.onnx | FP32 model.onnx |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in sorted(rows, key=_key):
        if r["weight_signed"] or (r["reference"], r["w_bits"]) in seen:
            continue  # sizes do not depend on the sign of the grid
        seen.add((r["reference"], r["w_bits"]))
        s = r["sizes"]
        fp32 = s["fp32_weight_bytes"]
        out.append(f"| {r['reference']} | W{r['w_bits']} | {fp32:,} B | {s['packed_weight_bytes']:,} B "
                   f"({fp32 / s['packed_weight_bytes']:.1f}x smaller) | {s['onnx_weight_bytes']:,} B "
                   f"({fp32 / s['onnx_weight_bytes']:.1f}x) | {s['qparam_bytes']:,} B | {s['model_onnx_bytes']:,} B | "
                   f"{s['fp32_model_onnx_bytes']:,} B |")
    return "\n".join(out)


def op_table(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({k for r in rows for k in r.get("ops", {})})
    out = ["| op | outputs compared | differing elements | largest difference |", "|---|---|---|---|"]
    for kind in kinds:
        stats = [r["ops"][kind] for r in rows if kind in r.get("ops", {})]
        elements = sum(s["elements"] for s in stats)
        differing = sum(s["differing_share"] * s["elements"] for s in stats)
        if any("max_rel_diff" in s for s in stats):
            largest = f"{max(s['max_rel_diff'] for s in stats):.2g} of the output's range (float rounding)"
        elif any("max_steps" in s for s in stats):
            largest = f"{max(s['max_steps'] for s in stats):.0f} grid step(s)"
        else:
            largest = "counted at the next quantizer"
        out.append(f"| {kind} | {elements:,} | {differing / elements:.2e} | {largest} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/export", help="folder searched for */checkpoints/last.ckpt")
    parser.add_argument("--out", default="benchmarks/results/export_accuracy_cpu.json")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the data module's)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N test images (a quick check)")
    parser.add_argument("--ops", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each op alone on one calibration batch")
    parser.add_argument("--report", action="store_true", help="only print the tables of the rows in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.is_file() else []
    if not args.report:
        done = {r["checkpoint"] for r in rows}
        ckpts = sorted(Path(args.runs).glob("**/checkpoints/last.ckpt"))
        if not ckpts:
            raise SystemExit(f"no */checkpoints/last.ckpt under {args.runs}: run python cli.py fit first")
        for ckpt in ckpts:
            name = _relative(ckpt)
            if name in done:
                continue
            rows.append(run_one(ckpt, name, args))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")  # resumable: a finished row is never redone
            r = rows[-1]
            print(f"{name}: PyTorch {r['torch']['top1']:.2f}, ORT {r['ort_optimized']['top1']:.2f}, agreement "
                  f"{r['ort_optimized']['agreement']:.2f}%", flush=True)
    if not rows:
        raise SystemExit(f"{out} holds no rows")
    print(table(rows), size_table(rows), op_table(rows), sep="\n\n")


if __name__ == "__main__":
    main()
