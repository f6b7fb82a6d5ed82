"""The table `cli.py test` ends with: which earlier test results of the run's family it compares with, and its rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evolq_pl.cli import cli_main
from evolq_pl.results import RESULTS_FILE, comparable, family_results, results_table


def record(scales: str, top1: float, **changes) -> dict:
    """A test_results.json record as TestResultsFile writes it (DemoDataModule, W3A8 tiny ViT)."""
    hparams = {"path": None, "calib_size": 64, "heldout_size": 64, "batch_size": 32, "test_batch_size": 32,
               "num_workers": 0, "seed": 0, "generations_per_epoch": 2, "image_size": None}
    base = {"top1": top1, "top5": 99.0, "model": "vit_tiny_patch16_224", "w_bits": 3, "a_bits": 8,
            "preset": "e2e", "seed": 0, "evaluated": "fp" if scales == "fp" else "quantized", "scales": scales,
            "ckpt": "runs/x/version_0/checkpoints/last.ckpt" if scales == "searched" else None,
            "quant_config": "QuantConfig(w_bits=3)", "test_images": 64, "precision": "32-true",
            "model_kwargs": None, "weights_id": 1234.5, "data": {"class": "evolq_pl.data.DemoDataModule",
                                                                 "hparams": hparams}}
    for key, value in changes.items():
        if key in hparams:
            base["data"]["hparams"][key] = value
        else:
            base[key] = value
    return base


def test_fp_and_baseline_match_only_the_same_model_test_images_and_calibration():
    searched = record("searched", 80.0)
    assert comparable(searched, record("fp", 85.0), "fp")
    assert comparable(searched, record("baseline", 79.0), "baseline")
    # the FP model does not depend on the quantization or the calibration set; the baseline does
    assert comparable(searched, record("fp", 85.0, quant_config="other", calib_size=500, seed=3), "fp")
    for change in ({"quant_config": "QuantConfig(w_bits=4)"}, {"calib_size": 500}, {"seed": 1}, {"batch_size": 64}):
        assert not comparable(searched, record("baseline", 79.0, **change), "baseline"), change
    # batch sizes of the test loop, workers and the held-out split change neither
    assert comparable(searched, record("baseline", 79.0, test_batch_size=500, num_workers=4, heldout_size=0),
                      "baseline")
    cli_written = record("fp", 85.0, _instantiator="lightning.pytorch.cli.instantiate_module")
    assert comparable(searched, cli_written, "fp")  # LightningCLI's own notes in the data options do not count
    for change in ({"weights_id": 1234.6}, {"model": "deit_tiny_patch16_224"}, {"test_images": 32},
                   {"precision": "bf16-mixed"}, {"image_size": 96}, {"model_kwargs": {"img_size": 96}}):
        assert not comparable(searched, record("fp", 85.0, **change), "fp"), change
    assert not comparable(searched, record("searched", 81.0), "baseline")
    old = {k: v for k, v in record("fp", 85.0).items() if k not in ("scales", "data", "weights_id")}
    assert not comparable(searched, old, "fp")  # written before these fields existed


def write(folder: Path, rec: dict, age: int = 0) -> None:
    folder.mkdir(parents=True)
    (folder / RESULTS_FILE).write_text(json.dumps(rec))
    os.utime(folder / RESULTS_FILE, (1e9 - age, 1e9 - age))


def test_the_table_shows_the_newest_comparable_fp_and_baseline_of_the_family(tmp_path):
    family, other = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    write(family / "version_1", record("searched", 80.0, ckpt=str(other / "version_0/checkpoints/last.ckpt")))
    write(family / "version_2", record("fp", 84.0), age=10)
    write(family / "version_3", record("fp", 85.0), age=5)  # the newer FP result
    write(family / "version_4", record("baseline", 79.0, test_images=32))  # other test images
    (family / "version_5").mkdir()
    (family / "version_5" / RESULTS_FILE).write_text("{half-writ")  # unreadable: skipped
    write(other / "version_7", record("baseline", 78.5))  # beside the checkpoint's run folder
    assert [p.name for p, _ in family_results(family / "version_1", None)] == ["version_4", "version_3", "version_2"]
    assert {p.name for p, _ in family_results(family / "version_1", str(other / "version_0/checkpoints/x.ckpt"))} == {
        "version_2", "version_3", "version_4", "version_7"}
    lines = results_table(family / "version_1").splitlines()
    assert lines[0].split() == ["model", "W/A", "top-1", "top-5", "images", "results"]
    assert lines[1].split()[:7] == ["searched", "(this", "test)", "vit_tiny_patch16_224", "W3A8", "80.00", "99.00"]
    assert lines[2].split()[:6] == ["calibrated", "baseline", "vit_tiny_patch16_224", "W3A8", "78.50", "99.00"]
    assert lines[2].endswith("version_7") and lines[3].endswith("version_3")
    assert lines[3].split()[:5] == ["FP", "vit_tiny_patch16_224", "FP", "85.00", "99.00"]
    assert lines[4:] == [f"searched: the scales of {other / 'version_0/checkpoints/last.ckpt'}"]

    (other / "version_7" / RESULTS_FILE).unlink()
    assert results_table(family / "version_1").splitlines()[-1] == (
        "no calibrated baseline result to compare beside this run: a test with the same config and no --ckpt_path "
        "adds one")


def table(capsys) -> list[list[str]]:
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.split() == ["model", "W/A", "top-1", "top-5", "images",
                                                                    "results"])
    return [line.split() for line in out[start + 1:] if line.strip()]


def test_cli_test_ends_with_the_table_of_this_test_and_the_family_s_fp_and_baseline(resumed_tiny_search, tmp_path,
                                                                                    capsys):
    args, runs = resumed_tiny_search
    args = list(args)
    args[args.index("--trainer.logger.init_args.save_dir") + 1] = str(tmp_path)
    args += ["--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false"]
    ckpt = str(Path(runs["resumed"][0].trainer.log_dir) / "checkpoints" / "last.ckpt")
    capsys.readouterr()

    cli_main(["test", *args, "--ckpt_path", ckpt])
    rows = table(capsys)
    assert rows[0][:3] == ["searched", "(this", "test)"] and rows[0][7] == "64"
    assert rows[1] == ["searched:", "the", "scales", "of", ckpt]
    assert [r[:3] for r in rows[2:]] == [["no", "calibrated", "baseline"], ["no", "FP", "result"]]

    cli_main(["test", *args, "--model.eval_fp", "true"])
    assert [r[0] for r in table(capsys)] == ["FP"]
    cli_main(["test", *args])
    assert [r[:2] for r in table(capsys)] == [["calibrated", "baseline"], ["FP", "vit_tiny_patch16_224"]]

    cli = cli_main(["test", *args, "--ckpt_path", ckpt])
    rows = table(capsys)[:3]
    results = {p.name: json.loads((p / RESULTS_FILE).read_text()) for p in (tmp_path / "evolq").iterdir()}
    assert [r[0] for r in rows] == ["searched", "calibrated", "FP"]
    by_folder = {r[-1].rsplit(os.sep, 1)[-1]: r for r in rows}
    assert len(by_folder) == 3 and Path(cli.trainer.log_dir).name in by_folder
    for folder, row in by_folder.items():
        assert row[-4:-1] == [f"{results[folder]['top1']:.2f}", f"{results[folder]['top5']:.2f}", "64"]
    assert results[Path(cli.trainer.log_dir).name]["scales"] == "searched"

    cli_main(["test", *args, "--ckpt_path", ckpt, "--trainer.limit_test_batches", "1"])  # other test images: none
    assert [r[0] for r in table(capsys)] == ["searched", "searched:", "no", "no"]


@pytest.mark.parametrize("scales", ["fp", "baseline"])
def test_only_a_searched_or_baseline_test_looks_for_comparisons(tmp_path, scales):
    write(tmp_path / "runs" / "version_0", record(scales, 80.0))
    write(tmp_path / "runs" / "version_1", record("fp", 85.0))
    lines = results_table(tmp_path / "runs" / "version_0").splitlines()
    assert len(lines) == (2 if scales == "fp" else 3)
    assert lines[-1].startswith("FP ")
