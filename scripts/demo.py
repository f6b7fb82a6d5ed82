"""`make demo`: Evol-Q on the shipped demo model and images, then FP / calibrated baseline / Evol-Q side by side.

Every number comes from cli.py itself (fit, validate, test), so the demo exercises exactly what a user runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import cli_main  # noqa: E402

CONFIG = str(ROOT / "configs" / "demo.yaml")


def run(*args: str):
    return cli_main([*args, "--config", CONFIG, "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false"])


def main() -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    fit = run("fit", "--trainer.logger.init_args.version", f"{stamp}-fit")
    ckpt = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    search_s = time.perf_counter() - started
    module = fit.model
    rows = {}
    for name, extra in (("FP", ["--model.eval_fp", "true"]), ("baseline (calibrated)", []),
                        ("Evol-Q", ["--ckpt_path", str(ckpt)])):
        held = run("validate", *extra, "--trainer.logger.init_args.version", f"{stamp}-val-{len(rows)}")
        test = run("test", *extra, "--trainer.logger.init_args.version", f"{stamp}-test-{len(rows)}")
        results = json.loads((Path(test.trainer.log_dir) / "test_results.json").read_text())
        rows[name] = (results["top1"], float(held.trainer.callback_metrics["heldout/top1"]),
                      float(held.trainer.callback_metrics["heldout/infonce"]))
    print(f"\nEvol-Q demo: {module.hparams.model_name} W{module.qconfig.w_bits}A{module.qconfig.a_bits}, "
          f"{module.hparams.num_passes} passes, search {search_s:.0f} s; checkpoint {ckpt.relative_to(ROOT)}")
    print(f"calibration fitness (infoNCE): baseline {module.baseline_fitness:.5f} -> Evol-Q "
          f"{module.current_fitness:.5f}")
    print(f"{'model':<24}{'test top-1':>12}{'held-out top-1':>16}{'held-out infoNCE':>18}")
    for name, (top1, held_top1, held_nce) in rows.items():
        print(f"{name:<24}{top1:>12.2f}{held_top1:>16.2f}{held_nce:>18.5f}")


if __name__ == "__main__":
    main()
