"""Write an export folder all at once: build, validate, check in ONNX Runtime, then publish by a rename.

Everything is written into a hidden staging folder beside the target and renamed into place only when every file
is complete and checked, so a failure (or a kill) never leaves a half-written export; an earlier export in the
target folder is replaced whole.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from evolq_pl.export.errors import ExportError
from evolq_pl.export.graph import OPSET
from evolq_pl.export.record import JSON_FILE, TENSORS_FILE, write_record
from evolq_pl.export.registry import build_onnx, exporter_for, quantized_mode
from evolq_pl.export.runtime import integer_kernels, logits, optimized_ops, session
from evolq_pl.models.base import QuantizedModel

MODEL_FILE, REPORT_FILE, LOG_FILE = "model.onnx", "export.json", "export_log.txt"
ARTIFACTS = (MODEL_FILE, TENSORS_FILE, JSON_FILE, REPORT_FILE, LOG_FILE)


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A fresh staging folder beside ``target``, renamed to ``target`` when the block succeeds, removed when not.

    Refuses up front (one line, nothing written) a target that cannot be written or that holds files other than
    an earlier export's.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ExportError(f"output '{target}' is a file: give a folder for the export")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in ARTIFACTS) if target.is_dir() else []
    if foreign:
        raise ExportError(f"output folder '{target}' holds other files ({', '.join(foreign[:3])}): give a new or "
                          "empty folder, or one holding an earlier export")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would become the export folder's mode
    except OSError as err:
        raise ExportError(f"cannot write the export into '{target}': {err.strerror or err}; choose another "
                          "--output folder") from None
    try:
        yield staging
        for path in staging.iterdir():  # safetensors writes 0600
            path.chmod(0o666 & ~umask)
        if target.is_dir():  # an earlier export: swap it out, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "export")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_quantized(model: QuantizedModel, output: str | Path, sample: torch.Tensor, source: str = "",
                     info: dict[str, Any] | None = None, threads: int = 1) -> dict[str, Any]:
    """Export a calibrated (or searched) model into the folder ``output``; returns what ``export.json`` holds.

    ``sample``: a batch of images [B, C, H, W] that fixes the input size and on which the ONNX model is run in
    ONNX Runtime and compared with the PyTorch model (use calibration images, never the test set).
    """
    exporter_for(model)
    with staged_folder(output) as staging:
        return write_export(model, staging, sample, source, info, threads)


def write_export(model: QuantizedModel, folder: Path, sample: torch.Tensor, source: str = "",
                 info: dict[str, Any] | None = None, threads: int = 1) -> dict[str, Any]:
    """The export's files, written into an existing (staging) folder; see :func:`export_quantized`."""
    info = info or {}
    label, _ = exporter_for(model)
    model.eval()
    proto, emitter = build_onnx(model, tuple(sample.shape[1:]), doc=f"{model.model_name}: {source}")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(folder / MODEL_FILE))
    with quantized_mode(model):
        record = write_record(model, folder, {"source": source, **info})
        with torch.no_grad():
            reference = model(sample).float().cpu().numpy()
    onnx.checker.check_model(str(folder / MODEL_FILE), full_check=True)  # the file as written
    ops = optimized_ops(folder / MODEL_FILE, threads)
    check = {}
    for mode, optimize in (("optimized", True), ("unoptimized", False)):
        out = logits(session(folder / MODEL_FILE, threads, optimize=optimize), sample)
        if not np.isfinite(out).all():
            raise ExportError(f"the exported model gives non-finite logits in ONNX Runtime ({mode} graph)")
        diff = np.abs(out - reference)
        check[mode] = {"images": len(sample), "top1_agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
                       "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean())}
    report = {
        "model": model.model_name, "family": label, "source": source, "qconfig": repr(model.qconfig),
        "input_shape": ["batch", *sample.shape[1:]], "opset": OPSET, "onnx": onnx.__version__,
        "onnxruntime": ort.__version__, "torch": torch.__version__, "machine": platform.machine(),
        "weight_containers": emitter.containers, "op_forms": emitter.forms,
        "nodes": len(proto.graph.node), "ort_optimized_ops": ops, "ort_integer_kernels": integer_kernels(ops),
        "check_on_sample": check, "sizes": record["sizes"] | {"model_onnx_bytes": (folder / MODEL_FILE).stat().st_size,
                                                              "record_bytes": (folder / TENSORS_FILE).stat().st_size},
        **info,
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str) + "\n")
    (folder / LOG_FILE).write_text(format_log(report) + "\n")
    return report


def format_log(report: dict[str, Any]) -> str:
    """The export log: what was exported, how each op is represented, what ONNX Runtime made of it."""
    sizes = report["sizes"]
    containers = ", ".join(f"{k} weights in {v}" for k, v in report["weight_containers"].items()) or "none"
    lines = [
        f"exported {report['model']} ({report['family']}) from the {report['source']}",
        f"quantization: {report['qconfig']}",
        f"ONNX opset {report['opset']}, onnx {report['onnx']}, onnxruntime {report['onnxruntime']}; "
        f"input {report['input_shape']}",
        f"weight containers: {containers} (int4/uint4 hold 2-4-bit grids, int8/uint8 hold 5-8-bit grids)",
        f"weights: {sizes['fp32_weight_bytes']:,} B as FP32 -> {sizes['packed_weight_bytes']:,} B packed in "
        f"{TENSORS_FILE}, {sizes['onnx_weight_bytes']:,} B in {MODEL_FILE} "
        f"(+ {sizes['qparam_bytes']:,} B of scales, zero points, gains and offsets)",
        "ops:",
        *(f"  {op}: {form}" for op, form in report["op_forms"].items()),
        f"ONNX Runtime's optimized graph: integer kernels {report['ort_integer_kernels'] or 'none'}",
    ]
    for mode, c in report["check_on_sample"].items():
        lines.append(f"ONNX Runtime ({mode}) vs PyTorch on {c['images']} sample images: top-1 agreement "
                     f"{100 * c['top1_agreement']:.2f}%, max |logit diff| {c['max_abs_logit_diff']:.4g}, mean "
                     f"{c['mean_abs_logit_diff']:.4g}")
    return "\n".join(lines)
