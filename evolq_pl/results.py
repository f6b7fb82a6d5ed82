"""Test results: the record a test writes, the earlier records of the same run family, and the table ``test`` prints.

``TestResultsFile`` (evolq_pl.callbacks) writes :func:`test_record` to ``test_results.json`` in the test's run folder;
``cli.py test`` then prints :func:`results_table`: this test's top-1/top-5 and, where the run's *family* has them, the
FP model's and the calibrated baseline's top-1. The family is every run folder beside this test's own
(``<save_dir>/<name>/*/``, the logger's versions) and beside the folder of the tested checkpoint. A record there
counts only if it measured the same thing:

- FP: written with ``eval_fp``, for the same model (name, ``model_kwargs``, fingerprint of the FP weights), the same
  test images (data module class, every data option except those that only pick or batch calibration and held-out
  images or set up the loaders, the number of images tested) and the same precision;
- baseline: the quantized model with no checkpoint and no search run in the process, with all of the above, the same
  quantization config and the same calibration set (``calib_size``, ``batch_size``, ``seed`` of the data module).

Of several such records the newest is shown. Records written before these fields existed never match. Nothing is
evaluated for the table: a comparison the family lacks is named with the option that produces it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch import Trainer

from evolq_pl.models.registry import weights_fingerprint
from evolq_pl.search.engine import same_state

if TYPE_CHECKING:
    from evolq_pl.module import EvolQModule

RESULTS_FILE = "test_results.json"
Scales = Literal["fp", "baseline", "searched"]

CALIBRATION_OPTIONS = ("calib_size", "batch_size", "seed")
"""Data options that choose or batch the calibration images (the baseline depends on them, the test images do not)."""
LOADER_OPTIONS = ("test_batch_size", "num_workers", "generations_per_epoch", "heldout_size")
"""Data options that change neither the test images nor the calibration set."""

LABELS: dict[str, str] = {"fp": "FP", "baseline": "calibrated baseline", "searched": "searched"}


def tested_scales(trainer: Trainer, module: EvolQModule) -> Scales:
    """What a test measured: the FP model, the calibrated baseline, or searched scales (a checkpoint's, or those of a
    search run in this process and not put back to the baseline)."""
    if module.hparams.eval_fp:
        return "fp"
    if trainer.ckpt_path:
        return "searched"
    engine = module.engine
    if engine.state.baseline_snapshot is None:
        return "baseline"  # calibrated, and no search has run in this process
    if engine.evaluator is not None and same_state(engine.snapshot(), engine.state.baseline_snapshot):
        return "baseline"
    return "searched"


def test_record(trainer: Trainer, module: EvolQModule, images: int) -> dict[str, Any]:
    """The test's metrics and everything :func:`comparable` needs to tell what they measured."""
    qconfig, hparams = module.qconfig, module.hparams
    datamodule = getattr(trainer, "datamodule", None)
    data = None if datamodule is None else {
        "class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "hparams": json.loads(json.dumps(dict(datamodule.hparams), default=str)),
    }
    return {
        **module.test_metrics, "model": hparams.model_name, "w_bits": qconfig.w_bits, "a_bits": qconfig.a_bits,
        "preset": qconfig.preset, "seed": hparams.seed, "evaluated": "fp" if hparams.eval_fp else "quantized",
        "scales": tested_scales(trainer, module), "ckpt": str(trainer.ckpt_path) if trainer.ckpt_path else None,
        "quant_config": repr(qconfig), "test_images": images, "precision": str(trainer.precision),
        "model_kwargs": json.loads(json.dumps(hparams.model_kwargs, default=str)),
        "weights_id": weights_fingerprint(module.qmodel), "data": data,
    }


def _same_test(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same FP model, same test images, same precision."""
    if any(not isinstance(r.get("data"), Mapping) or not isinstance(r.get("weights_id"), float) for r in (a, b)):
        return False

    def test_options(r: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r["data"]["hparams"].items()
                if k not in CALIBRATION_OPTIONS + LOADER_OPTIONS and not k.startswith("_")}  # _: LightningCLI's notes

    return (all(a.get(k) == b.get(k) for k in ("model", "model_kwargs", "test_images", "precision"))
            and math.isclose(a["weights_id"], b["weights_id"], rel_tol=1e-9)
            and a["data"]["class"] == b["data"]["class"] and test_options(a) == test_options(b))


def comparable(record: Mapping[str, Any], other: Mapping[str, Any], scales: Scales) -> bool:
    """Whether ``other`` is a test of ``scales`` ("fp" or "baseline") that ``record``'s numbers can be compared with."""
    if other.get("scales") != scales or not _same_test(record, other) or "top1" not in other:
        return False
    if scales == "fp":
        return True
    calibration = [{k: r["data"]["hparams"].get(k) for k in CALIBRATION_OPTIONS} for r in (record, other)]
    return other.get("quant_config") == record.get("quant_config") and calibration[0] == calibration[1]


def family_results(log_dir: Path, ckpt: str | None) -> list[tuple[Path, dict[str, Any]]]:
    """Readable ``test_results.json`` records of the run folders beside ``log_dir`` and beside the checkpoint's run
    folder (``<run>/checkpoints/<file>.ckpt``), ``log_dir``'s own excepted, newest first."""
    roots = {log_dir.parent}
    if ckpt and Path(ckpt).parent.name == "checkpoints":
        roots.add(Path(ckpt).parent.parent.parent)
    files = {p.resolve() for root in roots for p in root.glob(f"*/{RESULTS_FILE}") if p.is_file()}
    files.discard((log_dir / RESULTS_FILE).resolve())
    found = []
    for path in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a broken or half-written file of another run is no comparison
        if isinstance(record, dict):
            found.append((path.parent, record))
    return found


def _folder(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def results_table(log_dir: Path) -> str:
    """This test's row (from ``log_dir/test_results.json``) and the FP / baseline rows its family has, as text."""
    record = json.loads((log_dir / RESULTS_FILE).read_text())
    rows = [(f"{LABELS.get(record.get('scales'), record.get('evaluated', '?'))} (this test)", record, log_dir)]
    missing = []
    wanted: tuple[Scales, ...] = {"searched": ("baseline", "fp"), "baseline": ("fp",)}.get(record.get("scales"), ())
    family = family_results(log_dir, record.get("ckpt"))
    for scales in wanted:
        match = next(((folder, other) for folder, other in family if comparable(record, other, scales)), None)
        if match is None:
            missing.append(scales)
        else:
            rows.append((LABELS[scales], match[1], match[0]))
    header = ("", "model", "W/A", "top-1", "top-5", "images", "results")
    cells = [header] + [
        (label, str(r.get("model")), "FP" if r.get("scales") == "fp" else f"W{r.get('w_bits')}A{r.get('a_bits')}",
         f"{r['top1']:.2f}", f"{r['top5']:.2f}", str(r.get("test_images", "?")), _folder(folder))
        for label, r, folder in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i in (3, 4, 5) else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip() for row in cells]
    if record.get("scales") == "searched":
        lines.append(f"searched: the scales of {record['ckpt'] or 'the search run in this process'}")
    options = {"fp": "--model.eval_fp true", "baseline": "no --ckpt_path"}
    lines += [f"no {LABELS[s]} result to compare beside this run: a test with the same config and {options[s]} "
              "adds one" for s in missing]
    return "\n".join(lines)
