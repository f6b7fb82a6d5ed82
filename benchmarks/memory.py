"""Peak memory (RSS) of a search on ViT-Base shapes at 224 px, random weights, CPU, and what takes it.

    python -m benchmarks.memory --calib-sizes 100 200 --generations 2 --out benchmarks/results/memory_cpu_vit_base.json

Each calibration size runs in a fresh process (peak RSS is a per-process figure): ``EvolQModule`` under a Lightning
Trainer calibrates, builds the FP teacher's logits and runs the first block visit (the last block, as the search
starts) for ``--generations`` generations; the images are drawn on the fly from a seeded generator, as an image
folder decodes them, so no dataset array sits in memory. At each phase the process records its resident and peak
memory, and the sizes of what the search holds: the calibration images, the cached inputs of the visited block,
the teacher's logits, the population, the model's weights and quantizer state.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import Dataset

from evolq_pl.data import CalibrationDataModule

MODEL = "vit_base_patch16_224"
GIB = 2**30


def rss() -> dict[str, float]:
    """Resident and peak resident memory of this process (GiB), from /proc."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / GIB
    return {"rss_gib": fields["VmRSS"], "peak_gib": fields["VmHWM"]}


def nbytes(tensors: Any) -> float:
    """GiB held by the tensors in a (nested) list/dict."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size() / GIB
    if isinstance(tensors, dict):
        return sum(nbytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(nbytes(v) for v in tensors)
    return 0.0


class RandomImages(Dataset):
    """Seeded random 3x224x224 images made when read (like decoded files), labels 0."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(index)), 0


class RandomData(CalibrationDataModule):
    def _load_train(self) -> Dataset:
        return RandomImages(self.calib_size)

    def _load_test(self) -> Dataset:
        return RandomImages(1)

    def _item_id(self, index: int) -> str:
        return str(index)


class Phases(Callback):
    """Memory at each phase, and the sizes of what the search holds while a visit is in progress."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = [{"phase": "model built", **rss()}]
        self.held: dict[str, float] = {}
        self.started = time.perf_counter()

    def _mark(self, phase: str) -> None:
        self.rows.append({"phase": phase, "seconds": round(time.perf_counter() - self.started, 1), **rss()})

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark("calibrated, teacher logits made")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark(f"generation {trainer.global_step}")
        evaluator = pl_module.engine.evaluator
        if evaluator._inputs:  # the visit is in progress: its cached block inputs are held
            self.held = {
                "calibration_images": nbytes(pl_module._calib),
                "cached_block_inputs": nbytes(evaluator._inputs),
                "teacher_logits": nbytes(evaluator.teachers),
                "population": nbytes(pl_module.engine.state.strategy.state_dict()),
                "fp_weights": nbytes(list(pl_module.qmodel.parameters())),
                "quantizer_and_other_buffers": nbytes(list(pl_module.qmodel.buffers())),
            }


def measure(calib_size: int, batch_size: int, generations: int, threads: int) -> dict[str, Any]:
    """One search in this process; returns its row."""
    from evolq_pl.module import EvolQModule

    torch.set_num_threads(threads)
    module = EvolQModule(model_name=MODEL, pretrained=False, w_bits=4, num_passes=1, num_cycles=generations)
    phases = Phases()
    data = RandomData(calib_size=calib_size, batch_size=batch_size, generations_per_epoch=generations)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                      num_sanity_val_steps=0, limit_val_batches=0, max_epochs=1, callbacks=[phases])
    trainer.fit(module, datamodule=data)
    phases._mark("visit done")
    return {"model": MODEL, "image_size": 224, "calib_size": calib_size, "batch_size": batch_size,
            "generations": generations, "threads": threads, "phases": phases.rows,
            "held_gib": phases.held, "peak_gib": max(r["peak_gib"] for r in phases.rows),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-sizes", nargs="+", type=int, default=[1000])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--generations", type=int, default=2, help="generations of the first visit (>= 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.generations < 2:
        parser.error(f"--generations {args.generations}: give 2 or more (the held sizes are read mid-visit)")
    if args.one is not None:
        print(json.dumps(measure(args.one, args.batch_size, args.generations, args.threads)))
        return
    rows = []
    for size in args.calib_sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--one", str(size), "--batch-size",
                              str(args.batch_size), "--generations", str(args.generations), "--threads",
                              str(args.threads)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{size} images: peak {row['peak_gib']:.2f} GiB; held " +
              ", ".join(f"{k} {v:.3f}" for k, v in row["held_gib"].items()), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
