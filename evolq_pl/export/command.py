"""``python cli.py export``: the searched model of a checkpoint (or the calibrated baseline) into an export folder.

Bad input fails before the long parts and writes nothing: a missing ONNX/ONNX Runtime (on importing this package),
a family without an exporter, an output folder that cannot be written, a checkpoint of another model or bit width.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info

from evolq_pl.export.errors import ExportError
from evolq_pl.export.registry import exporter_for
from evolq_pl.export.writer import ARTIFACTS, format_log, staged_folder, write_export

if TYPE_CHECKING:
    from evolq_pl.data import CalibrationDataModule
    from evolq_pl.module import EvolQModule


def default_output(module: EvolQModule, ckpt_path: str | None) -> Path:
    """``<run folder>/export`` beside a checkpoint's run (``.../<run>/checkpoints/last.ckpt``), or for the calibrated
    baseline ``exports/<model>_w<W>a<A>[_sym]_baseline``."""
    if ckpt_path:
        ckpt = Path(ckpt_path)
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return run / "export"
    cfg = module.qconfig
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", module.hparams.model_name)
    return Path("exports") / f"{name}_w{cfg.w_bits}a{cfg.a_bits}{'_sym' if cfg.weight_signed else ''}_baseline"


def export_command(module: EvolQModule, datamodule: CalibrationDataModule | None, ckpt_path: str | None,
                   output: str | None) -> dict[str, Any]:
    """Export the model of ``ckpt_path`` (or the calibrated baseline) and say what was written."""
    from evolq_pl.trainer import quantized_model_for

    exporter_for(module.qmodel)
    if datamodule is None:
        raise ExportError("export needs the config's data: section (calibration images fix the input size and "
                          "check the ONNX model against PyTorch)")
    target = Path(output) if output else default_output(module, ckpt_path)
    with staged_folder(target) as staging:
        qmodel, source = quantized_model_for(module, datamodule, ckpt_path)
        datamodule.setup("fit")
        batch = next(iter(datamodule.calib_dataloader()))
        sample = batch[0] if isinstance(batch, list | tuple) else batch
        info = {"ckpt_path": ckpt_path, "hyper_parameters": dict(module.hparams),
                "data": {"class": type(datamodule).__name__, **dict(datamodule.hparams)}}
        report = write_export(qmodel, staging, sample, source, info)
    rank_zero_info(format_log(report))
    rank_zero_info(f"wrote {target}/: {', '.join(ARTIFACTS)}")
    return report
