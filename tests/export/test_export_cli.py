"""``python cli.py export``: the searched model beside its run, the calibrated baseline without a checkpoint, and bad
input (another bit width or quantization, an unwritable or foreign output folder, a family without an exporter, a
missing ONNX Runtime) refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import cli_main
from evolq_pl.export import ExportError, registry
from evolq_pl.export.writer import ARTIFACTS, REPORT_FILE
from evolq_pl.models.vit import QuantViT

ROOT = Path(__file__).resolve().parents[2]


def run_args(tiny_vit_checkpoint: str, root: Path, *extra: str) -> list[str]:
    """The tiny ViT at W3A8 on the demo images, one short search pass, logged under ``root``."""
    return [
        "--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path", tiny_vit_checkpoint,
        "--model.pretrained", "false", "--model.w_bits", "3", "--model.num_passes", "1",
        "--model.population_size", "4", "--model.tournament_size", "3", "--model.num_cycles", "2",
        "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64", "--data.heldout_size", "0",
        "--data.batch_size", "32", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(root), *extra,
    ]


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory, tiny_vit_checkpoint) -> Path:
    """A run folder of ``cli.py fit`` (version ``v``) with its last.ckpt."""
    root = tmp_path_factory.mktemp("runs")
    cli_main(["fit", *run_args(tiny_vit_checkpoint, root, "--trainer.logger.init_args.version", "v")])
    return root / "evolq" / "v"


def files(root: Path) -> dict[str, float]:
    """Every file and folder under ``root`` with its modification time (to show nothing was written)."""
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


def test_export_writes_the_searched_model_beside_its_run(searched_run, tiny_vit_checkpoint):
    last = searched_run / "checkpoints" / "last.ckpt"
    cli_main(["export", *run_args(tiny_vit_checkpoint, searched_run.parent), "--ckpt_path", str(last)])
    export = searched_run / "export"
    assert sorted(p.name for p in export.iterdir()) == sorted(ARTIFACTS)
    report = json.loads((export / REPORT_FILE).read_text())
    assert report["source"] == f"searched checkpoint {last}" and report["ckpt_path"] == str(last)
    assert report["weight_containers"] == {"3-bit unsigned": "uint4"}
    assert report["check_on_sample"]["optimized"]["top1_agreement"] >= 0.99
    assert "integer LayerNorm" in (export / "export_log.txt").read_text()
    assert not [p for p in searched_run.iterdir() if p.name.startswith(".export")]  # no staging left

    before = (export / "model.onnx").stat().st_mtime_ns
    cli_main(["export", *run_args(tiny_vit_checkpoint, searched_run.parent), "--ckpt_path", str(last)])
    assert (export / "model.onnx").stat().st_mtime_ns > before  # an earlier export is replaced whole
    assert sorted(p.name for p in export.iterdir()) == sorted(ARTIFACTS)
    assert not [p for p in searched_run.parent.rglob(".*")]  # neither staging nor the swapped-out old export


def test_without_a_checkpoint_the_calibrated_baseline_is_exported_and_said_so(tmp_path, monkeypatch,
                                                                             tiny_vit_checkpoint):
    monkeypatch.chdir(tmp_path)
    cli_main(["export", *run_args(tiny_vit_checkpoint, tmp_path / "runs")])
    export = tmp_path / "exports" / "vit_tiny_patch16_224_w3a8_baseline"
    report = json.loads((export / REPORT_FILE).read_text())
    assert report["source"].startswith("calibrated baseline (no --ckpt_path; 64 calibration images)")
    assert not (tmp_path / "runs").exists()  # the verb writes no run folder


def refused(args: list[str], error: type, message: str, watched: Path) -> None:
    before = files(watched)
    with pytest.raises(error, match=message) as info:
        cli_main(args)
    assert "\n" not in str(info.value), str(info.value)
    assert files(watched) == before


def test_a_checkpoint_of_another_bit_width_or_quantization_is_refused(searched_run, tiny_vit_checkpoint, tmp_path):
    last = str(searched_run / "checkpoints" / "last.ckpt")
    for extra, message in ((["--model.w_bits", "4"], r"another run: .*w_bits=3.*w_bits=4"),
                           (["--model.quant_overrides", "{weight_signed: true}"], r"another run: .*weight_signed")):
        args = ["export", *run_args(tiny_vit_checkpoint, tmp_path, *extra), "--ckpt_path", last,
                "--output", str(tmp_path / "out")]
        refused(args, ValueError, message, tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(searched_run, tiny_vit_checkpoint, tmp_path):
    last = str(searched_run / "checkpoints" / "last.ckpt")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    cases = [(tmp_path / "a_file" / "export", r"cannot write the export into .*a_file/export.*choose another"),
             (tmp_path / "a_file", r"output '.*a_file' is a file"),
             (tmp_path / "other", r"output folder '.*other' holds other files \(notes.txt\)")]
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "locked").mkdir(mode=0o555)
        cases.append((tmp_path / "locked" / "export", r"cannot write the export into .*Permission denied"))
    for output, message in cases:
        refused(["export", *run_args(tiny_vit_checkpoint, tmp_path), "--ckpt_path", last, "--output", str(output)],
                ExportError, message, tmp_path)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_a_family_without_an_exporter_is_refused_before_any_work(searched_run, tiny_vit_checkpoint, tmp_path,
                                                                monkeypatch):
    monkeypatch.delitem(registry.EXPORTERS, QuantViT)
    last = str(searched_run / "checkpoints" / "last.ckpt")
    refused(["export", *run_args(tiny_vit_checkpoint, tmp_path), "--ckpt_path", last, "--output",
             str(tmp_path / "out")], ExportError, r"model family QuantViT has no ONNX exporter", tmp_path)


def test_a_missing_onnx_runtime_is_one_line_and_writes_nothing(searched_run, tiny_vit_checkpoint, tmp_path):
    last = str(searched_run / "checkpoints" / "last.ckpt")
    args = ["export", *run_args(tiny_vit_checkpoint, tmp_path), "--ckpt_path", last, "--output", str(tmp_path / "out")]
    code = ("import sys; sys.modules['onnxruntime'] = None  # an import of it now fails, as when it is not installed\n"
            f"from evolq_pl.cli import cli_main; cli_main({args!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("evolq_pl.export.errors.ExportError: the export needs onnxruntime, which cannot be "
                                "imported: pip install onnxruntime"), result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
