"""`make demo`: Evol-Q on the shipped demo model and images, then FP / calibrated baseline / Evol-Q side by side.

The search runs through cli.py exactly as a user runs it; the three evaluations then reuse the fitted module and
data module in-process (one calibration in all). Held-out numbers come from a split of the demo *train* images,
test numbers from the demo test images, which the search never sees.
"""

from __future__ import annotations

import time
from pathlib import Path

from evolq_pl.cli import cli_main
from evolq_pl.console import quiet_lightning

ROOT = Path(__file__).resolve().parents[1]

CONFIG = str(ROOT / "configs" / "demo.yaml")


def evaluate(cli, fp: bool = False) -> tuple[float, float, float]:
    """(test top-1, held-out top-1, held-out infoNCE) of the module as it stands."""
    module, trainer, data = cli.model, cli.trainer, cli.datamodule
    module.hparams.eval_fp = fp
    try:
        with quiet_lightning():  # as cli_main runs the fit
            held = trainer.validate(module, datamodule=data, verbose=False)[0]
            test = trainer.test(module, datamodule=data, verbose=False)[0]
    finally:
        module.hparams.eval_fp = False
    return test["test/top1"], held["heldout/top1"], held["heldout/infonce"]


def main() -> None:
    started = time.perf_counter()
    cli = cli_main(["fit", "--config", CONFIG, "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false"])
    search_s = time.perf_counter() - started
    module = cli.model
    rows = {"FP": evaluate(cli, fp=True)}
    with module.engine.at_baseline():
        rows["baseline (calibrated)"] = evaluate(cli)
    rows["Evol-Q"] = evaluate(cli)
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    print(f"\nEvol-Q demo: {module.hparams.model_name} W{module.qconfig.w_bits}A{module.qconfig.a_bits}, "
          f"{module.hparams.num_passes} passes over {len(module.blocks)} blocks; calibration + search "
          f"{search_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    print(f"calibration fitness (infoNCE): baseline {module.baseline_fitness:.5f} -> Evol-Q "
          f"{module.current_fitness:.5f}")
    print(f"{'model':<24}{'test top-1':>12}{'held-out top-1':>16}{'held-out infoNCE':>18}")
    for name, (top1, held_top1, held_nce) in rows.items():
        print(f"{name:<24}{top1:>12.2f}{held_top1:>16.2f}{held_nce:>18.5f}")
    print(f"searched checkpoint: {ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt}")
    print(f"TensorBoard: tensorboard --logdir {Path(cli.trainer.log_dir).parent}")


if __name__ == "__main__":
    main()
