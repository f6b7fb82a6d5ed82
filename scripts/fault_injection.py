"""Fault injection: SIGKILL a ``cli.py fit`` search at random points, resume it with ``--ckpt_path last`` each time,
and check that it ends bitwise identical to an uninterrupted run.

    python scripts/fault_injection.py --kills 6 --seed 1

The search is the paper's recipe at W3A8 (population 15, tournament 10, 3 generations per visit) with 2 passes and
200 of the demo's calibration images to keep it short, on the shipped 6-block ViT checkpoints/vit6_fmnist.pth, or,
where that file is missing, on the trained 3-block test ViT, which the script then trains itself as
tests/conftest.py does. Each process prints a stamp
when a generation starts and ends (a callback added with ``--trainer.callbacks+=``), so the script knows where it
kills: in the middle of a generation, right after one, inside the write of last.ckpt (its temporary file exists),
or during start-up (import, calibration, restore).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
STAMP = "evolq-stamp"
DEMO_WEIGHTS = ROOT / "checkpoints" / "vit6_fmnist.pth"


class GenerationStamp(Callback):
    """Prints ``evolq-stamp start|end <generation>`` to stdout so that a watching process knows the progress."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a resume at a visit's end replays that visit's ticks as no-ops: they are not generations
        self.real = pl_module.engine.next_visit == trainer.current_epoch
        if self.real:
            print(f"{STAMP} start {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.real:
            print(f"{STAMP} end {trainer.global_step - 1}", flush=True)


def search_args(weights: Path, save_dir: Path, passes: int, calib: int) -> list[str]:
    return [
        "fit", "--model.model_name", "vit_tiny_patch16_224", "--model.pretrained", "false",
        "--model.checkpoint_path", str(weights), "--model.w_bits", "3", "--model.a_bits", "8",
        "--model.population_size", "15", "--model.tournament_size", "10", "--model.num_cycles", "3",
        "--model.num_passes", str(passes), "--model.seed", "0",
        "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", str(calib), "--data.heldout_size", "0",
        "--data.batch_size", "100", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.name", "fault", "--trainer.callbacks+=fault_injection.GenerationStamp",
    ]


@dataclass
class Search:
    """One ``cli.py fit`` process and the stamps it printed (read by a thread so the pipe never fills)."""

    args: list[str]
    log: Path
    stamps: queue.Queue = field(default_factory=queue.Queue)
    started: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
        self.err = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "cli.py", *self.args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=self.err, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(STAMP):
                _, kind, step = line.split()
                self.stamps.put((kind, int(step)))
        self.stamps.put(("exit", -1))

    def next_stamp(self, timeout: float) -> tuple[str, int]:
        kind, step = self.stamps.get(timeout=timeout)
        (self.started if kind == "start" else self.ended if kind == "end" else []).append(step)
        return kind, step

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        rc = self.proc.wait()
        while self.next_stamp(timeout=60)[0] != "exit":  # every stamp printed before the pipe closed
            pass
        self.err.close()
        return rc


def newest_last(save_dir: Path) -> Path | None:
    found = list(save_dir.glob("fault/*/checkpoints/last*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def temp_files(save_dir: Path) -> list[Path]:
    """Temporary files of checkpoint saves in progress (or of saves a kill interrupted)."""
    return list(save_dir.glob("fault/*/checkpoints/.last.ckpt.*.tmp"))


def saved_step(save_dir: Path) -> int:
    import torch

    last = newest_last(save_dir)
    return -1 if last is None else int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


def same_search(a: Path, b: Path) -> tuple[bool, str]:
    """Bitwise comparison of two final checkpoints: quantizer state, the whole search state, step."""
    import torch

    from evolq_pl.search.engine import same_state

    x, y = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    if x["global_step"] != y["global_step"]:
        return False, f"global_step {x['global_step']} vs {y['global_step']}"
    for key in x["state_dict"]:
        if not torch.equal(x["state_dict"][key], y["state_dict"][key]):
            return False, f"state_dict[{key}] differs"
    differ = [key for key in x["evolq"]["search"] if not same_state(x["evolq"]["search"][key],
                                                                     y["evolq"]["search"].get(key))]
    if differ:
        return False, f"search state differs: {differ}"
    return True, f"{len(x['state_dict'])} quantizer tensors and the search state (strategy, generator, counters) equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs before the search may finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (the search seed is fixed)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the blocks (3 generations per visit)")
    parser.add_argument("--calib", type=int, default=200, help="calibration images (the demo uses 500)")
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS if DEMO_WEIGHTS.is_file() else None,
                        help="weight file to search (default: the demo's checkpoints/vit6_fmnist.pth if present, "
                             "else the tiny test ViT, trained here)")
    parser.add_argument("--workdir", type=Path, help="where runs go (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for one process's next stamp")
    opts = parser.parse_args()
    rnd = random.Random(opts.seed)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="evolq_fault_"))
    work.mkdir(parents=True, exist_ok=True)
    weights = opts.weights
    if weights is None:
        weights = work / "tiny_vit.pth"
        if not weights.is_file():
            from evolq_pl.testing import train_tiny_vit

            started = time.perf_counter()
            train_tiny_vit(weights)
            print(f"trained the tiny ViT in {time.perf_counter() - started:.0f} s -> {weights}")

    started = time.perf_counter()
    ref = Search(search_args(weights, work / "uninterrupted", opts.passes, opts.calib), work / "uninterrupted.log")
    if ref.finish() != 0:
        sys.exit(f"the uninterrupted run failed; see {ref.log}")
    total = len(set(ref.ended))
    ref_seconds = time.perf_counter() - started

    # kill points: one during start-up, the others at distinct random generations, mid-generation or at a save
    targets = sorted(rnd.sample(range(total - 1), opts.kills - 1))
    modes = [("mid-generation", "after a generation", "inside a save")[i % 3] for i in range(len(targets))]
    rnd.shuffle(modes)
    plan = list(zip(modes, targets, strict=True))
    plan.insert(rnd.randrange(len(plan) + 1), ("start-up", -1))
    save_dir, kills = work / "interrupted", []
    started = time.perf_counter()
    for number, (where, target) in enumerate(plan):
        resumed_from = saved_step(save_dir)
        proc = Search(search_args(weights, save_dir, opts.passes, opts.calib) + ["--ckpt_path", "last"],
                      work / f"interrupted_{number}.log")
        if where == "start-up":
            time.sleep(rnd.uniform(1.0, 10.0))  # importing, building, calibrating or restoring
        else:
            watch = "start" if where == "mid-generation" else "end"
            while True:
                kind, step = proc.next_stamp(timeout=opts.timeout)
                if kind == "exit":
                    sys.exit(f"process {number} ended before generation {target}; see {proc.log}")
                if kind == watch and step >= target:
                    break
            if where == "inside a save":  # last.ckpt's temporary file exists from its open to its os.replace
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and not temp_files(save_dir):
                    time.sleep(0.0002)
            else:
                time.sleep(rnd.uniform(0.0, 0.15) if where == "mid-generation" else rnd.uniform(0.0, 0.01))
        proc.kill()
        step = saved_step(save_dir)  # must load: a kill never leaves a broken last.ckpt
        leftover = temp_files(save_dir)
        redone = max(proc.started, default=-1) + 1 - max(step, 0) if proc.started else 0
        kills.append({"kill": number + 1, "where": where, "resumed_from": resumed_from, "saved_step": step,
                      "generations_started": len(set(proc.started)), "generations_redone": max(redone, 0),
                      "killed_inside_a_save": bool(leftover)})
        print(json.dumps(kills[-1]))
    resumed_from = saved_step(save_dir)
    final = Search(search_args(weights, save_dir, opts.passes, opts.calib) + ["--ckpt_path", "last"],
                   work / "interrupted_final.log")
    if final.finish() != 0:
        sys.exit(f"the final resume failed; see {final.log}")
    interrupted_seconds = time.perf_counter() - started
    identical, detail = same_search(newest_last(work / "uninterrupted"), newest_last(save_dir))
    summary = {
        "generations": total, "kills_survived": len(kills), "final_resume_from": resumed_from,
        "generations_redone": [k["generations_redone"] for k in kills],
        "max_generations_redone_per_kill": max(k["generations_redone"] for k in kills),
        "kills_inside_a_save": sum(k["killed_inside_a_save"] for k in kills),
        "run_folders": sorted(p.name for p in (save_dir / "fault").iterdir()),
        "identical": identical, "detail": detail,
        "uninterrupted_s": round(ref_seconds, 1), "interrupted_total_s": round(interrupted_seconds, 1),
    }
    print(json.dumps(summary))
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
