"""Fault injection: SIGKILL a ``cli.py fit`` search at random moments, resume it with ``--ckpt_path last`` each time,
and check that it ends bitwise identical to an uninterrupted run, with the same test top-1.

    python scripts/fault_injection.py --kills 24 --seed 3 --log benchmarks/results/fault_injection.jsonl

The search is the paper's recipe at W3A8 (population 15, tournament 10, 3 generations per visit) with 2 passes,
200 of the demo's calibration images and 200 held-out images (``selection: heldout``, validated after every block
visit), on the shipped 6-block ViT checkpoints/vit6_fmnist.pth, or, where that file is missing, on the trained
3-block test ViT, which the script then trains itself as tests/conftest.py does.

Each process prints a stamp when the fit starts (before calibration), when each generation starts and ends and when
each held-out validation starts and ends (a callback added with ``--trainer.callbacks+=``). The script aims each
kill at one of six moments: start-up (import, build, restore), calibration (only before the first checkpoint, when
a process calibrates), mid-generation, just after a generation, inside the write of last.ckpt (its temporary file
exists) or during a held-out validation. Where it landed is read back from the stamps the killed process printed and
from its log, and recorded beside the aim.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import signal
import statistics
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
CALIBRATED = "calibrated "  # the module's log line once calibration is done
AIMS = ("mid-generation", "after a generation", "inside a save", "held-out validation")


class GenerationStamp(Callback):
    """Prints ``evolq-stamp <kind> <step>`` to stdout so that a watching process knows the progress: ``fit`` (before
    calibration), ``start``/``end`` of a generation, ``val``/``valend`` of a held-out validation."""

    real = False
    events: list[tuple[str, int, float]] = []  # the same stamps, for a run inside the watching process

    @classmethod
    def _print(cls, kind: str, step: int) -> None:
        print(f"{STAMP} {kind} {step}", flush=True)
        cls.events.append((kind, step, time.monotonic()))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._print("fit", trainer.global_step)  # Lightning calls callbacks before the module, which calibrates

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a resume at a visit's end replays that visit's ticks as no-ops: they are not generations
        self.real = pl_module.engine.next_visit == trainer.current_epoch
        if self.real:
            self._print("start", trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.real:
            self._print("end", trainer.global_step - 1)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._print("val", trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._print("valend", trainer.global_step)


def search_args(weights: Path, save_dir: Path, opts: argparse.Namespace) -> list[str]:
    return [
        "fit", "--model.model_name", "vit_tiny_patch16_224", "--model.pretrained", "false",
        "--model.checkpoint_path", str(weights), "--model.w_bits", "3", "--model.a_bits", "8",
        "--model.population_size", "15", "--model.tournament_size", "10", "--model.num_cycles", "3",
        "--model.num_passes", str(opts.passes), "--model.seed", "0", "--model.selection", "heldout",
        "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", str(opts.calib),
        "--data.heldout_size", str(opts.heldout), "--data.batch_size", "100", "--data.test_batch_size", "500",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.name", "fault", "--trainer.callbacks+=fault_injection.GenerationStamp",
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}


@dataclass
class Search:
    """One ``cli.py`` process and the stamps it printed, with their arrival times (read by a thread so the pipe
    never fills)."""

    args: list[str]
    log: Path
    stamps: queue.Queue = field(default_factory=queue.Queue)
    seen: list[tuple[str, int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.err = self.log.open("w")
        self.began = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "cli.py", *self.args], cwd=ROOT, env=env(), text=True,
                                     stdout=subprocess.PIPE, stderr=self.err, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(STAMP):
                _, kind, step = line.split()
                self.stamps.put((kind, int(step), time.monotonic()))
        self.stamps.put(("exit", -1, time.monotonic()))

    def next_stamp(self, timeout: float) -> tuple[str, int]:
        kind, step, when = self.stamps.get(timeout=timeout)
        if kind != "exit":
            self.seen.append((kind, step, when))
        return kind, step

    def steps(self, kind: str) -> list[int]:
        return [s for k, s, _ in self.seen if k == kind]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        rc = self.proc.wait()
        while self.next_stamp(timeout=60)[0] != "exit":  # every stamp printed before the pipe closed
            pass
        self.err.close()
        return rc

    def durations(self, first: str, then: str) -> list[float]:
        """Seconds from each ``first`` stamp to the next ``then`` stamp."""
        out, began = [], None
        for kind, _, when in self.seen:
            if kind == first:
                began = when
            elif kind == then and began is not None:
                out.append(when - began)
                began = None
        return out


class InProcess(Search):
    """A run inside this process (``--in-process``): no interpreter start; the stamps are read from the callback."""

    def __post_init__(self) -> None:
        import importlib

        import torch

        from evolq_pl.cli import cli_main

        torch.set_num_threads(int(env()["OMP_NUM_THREADS"]))  # the same kernels' sums as the killed processes
        sys.path.insert(0, str(ROOT / "scripts"))
        stamp = importlib.import_module("fault_injection").GenerationStamp  # the class the CLI instantiates
        stamp.events = []
        self.began = time.monotonic()
        try:
            cli_main(self.args)
            self.rc = 0
        except Exception as err:  # noqa: BLE001 (reported as the run's failure, as a process's exit code)
            self.log.write_text(f"{type(err).__name__}: {err}\n")
            self.rc = 1
        self.seen = list(stamp.events)

    def finish(self) -> int:
        return self.rc


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


def landed(proc: Search, leftover: bool, fresh: bool) -> str:
    """Where the kill hit, from the last stamp the process printed and its log (``fresh``: no checkpoint to resume,
    so the process calibrates)."""
    if not proc.seen:
        return "start-up"
    kind = proc.seen[-1][0]
    if kind == "fit":
        return "calibration" if fresh and CALIBRATED not in proc.log.read_text() else "teacher logits"
    if kind == "start":
        return "mid-generation"
    if kind == "val":
        return "held-out validation"
    what = "after a generation" if kind == "end" else "after a held-out validation"
    return "inside a save" if leftover else what


def same_search(a: Path, b: Path) -> tuple[bool, str]:
    """Bitwise comparison of two final checkpoints: quantizer state, the whole search state, step."""
    import torch

    from evolq_pl.search.engine import same_state

    x, y = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    if x["global_step"] != y["global_step"]:
        return False, f"global_step {x['global_step']} vs {y['global_step']}"
    if x["state_dict"].keys() != y["state_dict"].keys():
        return False, "the checkpoints hold other quantizer tensors"
    for key in x["state_dict"]:
        if not torch.equal(x["state_dict"][key], y["state_dict"][key]):
            return False, f"state_dict[{key}] differs"
    differ = [key for key in x["evolq"]["search"] if not same_state(x["evolq"]["search"][key],
                                                                     y["evolq"]["search"].get(key))]
    if differ:
        return False, f"search state differs: {differ}"
    return True, (f"{len(x['state_dict'])} quantizer tensors and the search state (strategy, generator, counters, "
                  "held-out selection) equal")


def test_top1(weights: Path, ckpt: Path, save_dir: Path, opts: argparse.Namespace) -> float:
    """``cli.py test`` of a checkpoint on the demo's 2000 test images; its test_results.json top-1."""
    args = [a if a != "fit" else "test" for a in search_args(weights, save_dir, opts)]
    args = [a for a in args if a != "--trainer.callbacks+=fault_injection.GenerationStamp"]
    args += ["--ckpt_path", str(ckpt)]
    if opts.in_process:
        from evolq_pl.cli import cli_main

        cli_main(args)
    else:
        subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(json.loads(next(save_dir.glob("fault/*/test_results.json")).read_text())["top1"])


def plan_kills(rnd: random.Random, kills: int, generations: int, visits: int) -> list[tuple[str, int]]:
    """(aim, generation) per kill: one or two during calibration first (no checkpoint exists yet), one at start-up,
    the others at random generations (validations: at random visits), the four aims in turn, then shuffled."""
    calibration = min(2, max(kills - 2, 0))
    rest = kills - calibration - 1
    aims = [AIMS[i % len(AIMS)] for i in range(rest)]
    per_visit = generations // visits  # a validation's stamp carries the step after its visit's last generation
    targets = [(rnd.randrange(visits - 1) + 1) * per_visit if a == "held-out validation"
               else rnd.randrange(generations - 1) for a in aims]
    plan = list(zip(aims, targets, strict=True))
    plan.append(("start-up", -1))
    rnd.shuffle(plan)
    plan.sort(key=lambda p: p[1])  # the search only moves forward: aim at increasing points
    return [("calibration", -1)] * calibration + plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs before the search may finish (>= 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (the search seed is fixed)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the blocks (3 generations per visit)")
    parser.add_argument("--calib", type=int, default=200, help="calibration images (the demo uses 500)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out images, validated after every visit")
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS if DEMO_WEIGHTS.is_file() else None,
                        help="weight file to search (default: the demo's checkpoints/vit6_fmnist.pth if present, "
                             "else the tiny test ViT, trained here)")
    parser.add_argument("--workdir", type=Path, help="where runs go (default: a temporary folder)")
    parser.add_argument("--log", type=Path, help="also write the per-kill rows and the summary here (JSON lines)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for one process's next stamp")
    parser.add_argument("--in-process", action="store_true",
                        help="run the uninterrupted search, the last resume and the tests in this process (three "
                             "interpreter starts fewer; the test suite's short version)")
    opts = parser.parse_args(argv)
    if opts.kills < 3:
        parser.error(f"--kills {opts.kills}: give 3 or more (calibration, start-up and a search moment)")
    if opts.heldout < 1:
        parser.error(f"--heldout {opts.heldout}: give 1 or more (kills during held-out validation need one)")
    rnd = random.Random(opts.seed)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="evolq_fault_"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if opts.log is not None:
            opts.log.parent.mkdir(parents=True, exist_ok=True)
            opts.log.write_text("".join(json.dumps(r) + "\n" for r in rows))

    weights = opts.weights
    if weights is None:
        weights = work / "tiny_vit.pth"
        if not weights.is_file():
            from evolq_pl.testing import train_tiny_vit

            started = time.perf_counter()
            train_tiny_vit(weights)
            print(f"trained the tiny ViT in {time.perf_counter() - started:.0f} s -> {weights}")

    started = time.perf_counter()
    whole = InProcess if opts.in_process else Search
    ref = whole(search_args(weights, work / "uninterrupted", opts), work / "uninterrupted.log")
    if ref.finish() != 0:
        sys.exit(f"the uninterrupted run failed; see {ref.log}")
    ref_seconds = time.perf_counter() - started
    generations, visits = len(set(ref.steps("end"))), len(ref.steps("val"))
    calib_s = statistics.median(ref.durations("fit", "start"))  # calibration and teacher logits
    val_s = statistics.median(ref.durations("val", "valend"))

    save_dir = work / "interrupted"
    started = time.perf_counter()
    for number, (aim, target) in enumerate(plan_kills(rnd, opts.kills, generations, visits)):
        resumed_from, stale = saved_step(save_dir), set(temp_files(save_dir))
        proc = Search(search_args(weights, save_dir, opts) + ["--ckpt_path", "last"],
                      work / f"interrupted_{number}.log")
        watch = {"calibration": "fit", "mid-generation": "start", "held-out validation": "val"}.get(aim, "end")
        if aim == "start-up":
            # importing, building or restoring: at the first stamp at the latest, which a fast machine reaches in
            # seconds (a fixed sleep could outlast the whole resumed search)
            with contextlib.suppress(queue.Empty):
                proc.next_stamp(timeout=rnd.uniform(1.0, 10.0))
        else:
            while True:
                kind, step = proc.next_stamp(timeout=opts.timeout)
                if kind == "exit":
                    sys.exit(f"process {number} ended before its kill ({aim}, {target}); see {proc.log}")
                if kind == watch and (aim == "calibration" or step >= target):
                    break
            if aim == "inside a save":  # last.ckpt's temporary file exists from its open to its os.replace
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and not temp_files(save_dir):
                    time.sleep(0.0002)
            elif aim == "calibration":
                time.sleep(rnd.uniform(0.0, 0.5 * calib_s))
            elif aim == "held-out validation":
                time.sleep(rnd.uniform(0.0, 0.8 * val_s))
            else:
                time.sleep(rnd.uniform(0.0, 0.15) if aim == "mid-generation" else rnd.uniform(0.0, 0.01))
        proc.kill()
        leftover = bool(set(temp_files(save_dir)) - stale)  # this process's save was cut short
        step = saved_step(save_dir)  # must load: a kill never leaves a broken last.ckpt
        started_gens = proc.steps("start")
        redone = max(started_gens) + 1 - max(step, 0) if started_gens else 0
        emit({"kill": number + 1, "aim": aim, "landed": landed(proc, leftover, resumed_from < 0), "resumed_from": resumed_from,
              "saved_step": step, "last_ckpt_loads": True, "generations_started": len(set(started_gens)),
              "generations_redone": max(redone, 0), "validations_started": len(proc.steps("val")),
              "temp_file_left": leftover, "seconds": round(time.monotonic() - proc.began, 2)})
    resumed_from = saved_step(save_dir)
    final = whole(search_args(weights, save_dir, opts) + ["--ckpt_path", "last"], work / "interrupted_final.log")
    if final.finish() != 0:
        sys.exit(f"the final resume failed; see {final.log}")
    interrupted_seconds = time.perf_counter() - started
    ref_last, final_last = newest_last(work / "uninterrupted"), newest_last(save_dir)
    identical, detail = same_search(ref_last, final_last)
    top1 = {name: test_top1(weights, ckpt, work / f"test_{name}", opts)
            for name, ckpt in (("uninterrupted", ref_last), ("interrupted", final_last))}
    kills = [r for r in rows if "kill" in r]
    emit({
        "summary": True, "weights": weights.name, "generations": generations, "validations": visits,
        "kills_survived": len(kills), "final_resume_from": resumed_from,
        "landed": {w: sum(k["landed"] == w for k in kills) for w in sorted({k["landed"] for k in kills})},
        "max_generations_redone_per_kill": max(k["generations_redone"] for k in kills),
        "kills_inside_a_save": sum(k["landed"] == "inside a save" for k in kills),
        "run_folders": sorted(p.name for p in (save_dir / "fault").iterdir()),
        "identical": identical, "detail": detail, "test_top1": top1,
        "test_top1_equal": top1["uninterrupted"] == top1["interrupted"],
        "uninterrupted_s": round(ref_seconds, 1), "interrupted_total_s": round(interrupted_seconds, 1),
        "median_calibration_and_teacher_s": round(calib_s, 2), "median_validation_s": round(val_s, 2),
    })
    if not (identical and top1["uninterrupted"] == top1["interrupted"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
