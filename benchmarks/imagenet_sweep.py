"""ImageNet sweep for the README table: every paper model x bit width x seed, fit then test through cli.py.

    python -m benchmarks.imagenet_sweep --root /path/to/imagenet --bits 3 4 8 --seeds 0 1 2 --out runs/sweep

Needs the ImageNet ImageFolder tree and the timm weights in the local cache (or edit the configs'
``checkpoint_path``). Each run's ``test_results.json`` is collected; finished runs are skipped on a rerun, so the
sweep can be resumed. Prints a Markdown table of top-1 mean ± sd over seeds (baseline and Evol-Q).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.accuracy import mean_sd

ROOT = Path(__file__).resolve().parents[1]

MODELS = ["vit_base", "deit_tiny", "deit_small", "deit_base", "levit_128s", "levit_128", "levit_192", "levit_256",
          "levit_384"]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True, cwd=ROOT)


def run(model: str, bits: int, seed: int, root: str, out: Path) -> dict[str, dict]:
    config = str(ROOT / "configs" / f"w{bits}_{model}.yaml")
    name = f"w{bits}_{model}_s{seed}"
    common = ["--config", config, "--data.init_args.root", root, "--seed_everything", str(seed),
              "--model.seed", str(seed), "--data.init_args.seed", str(seed),
              "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name]
    results = {}
    for kind, extra in (("baseline", []), ("evolq", None)):
        target = out / name / kind / "test_results.json"
        if not target.is_file():
            if extra is None:
                fit_dir = out / name / "fit"
                if not (fit_dir / "checkpoints" / "last.ckpt").is_file() or not (fit_dir / "done").is_file():
                    cli("fit", *common, "--trainer.logger.init_args.version", "fit",
                        *(["--ckpt_path", "last"] if (fit_dir / "checkpoints" / "last.ckpt").is_file() else []))
                    (fit_dir / "done").touch()
                extra = ["--ckpt_path", str(fit_dir / "checkpoints" / "last.ckpt")]
            cli("test", *common, "--trainer.logger.init_args.version", kind, *extra)
        results[kind] = json.loads(target.read_text())
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="ImageNet root with train/ and val/")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    args = parser.parse_args(argv)
    print("| model | W/A | baseline top-1 | Evol-Q top-1 | seeds |\n|---|---|---|---|---|")
    for model in args.models:
        for bits in args.bits:
            cells = [run(model, bits, seed, args.root, args.out) for seed in args.seeds]
            base = [c["baseline"]["top1"] for c in cells]
            evo = [c["evolq"]["top1"] for c in cells]
            print(f"| {model} | W{bits}A8 | {mean_sd(base)} | {mean_sd(evo)} | {len(cells)} |", flush=True)


if __name__ == "__main__":
    main()
