"""A search is never lost and never wrong: SIGKILL and resume, determinism, atomic saves, bad input.

Runs go through cli.py (in process, or as a subprocess where a real kill is needed) on the trained tiny ViT.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main
from evolq_pl.checkpoint_io import AtomicCheckpointIO, temp_files
from evolq_pl.data import DEMO_SET

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3 * 2 * 2  # blocks x passes x generations


def run_args(root: Path, ckpt: str, *extra: str, seed: int = 3, data: tuple[str, ...] | None = None) -> list[str]:
    """A two-pass search of the tiny ViT, logged under ``root``; ``data`` replaces the demo data options."""
    data = data or ("--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64", "--data.heldout_size", "0",
                    "--data.batch_size", "16")
    return [
        "fit", "--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path", ckpt,
        "--model.pretrained", "false", "--model.w_bits", "3", "--model.num_passes", "2",
        "--model.population_size", "4", "--model.tournament_size", "3", "--model.num_cycles", "2",
        "--model.seed", str(seed), *data,
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(root), *extra,
    ]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [s.value for s in events.Scalars(tag)]


def assert_same_search(a: dict, b: dict) -> None:
    """Bitwise equal quantizer state, population and generator state."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa, sb = a["evolq"]["search"], b["evolq"]["search"]
    pa, pb = sa["strategy"]["population"], sb["strategy"]["population"]
    assert pa["fitness"] == pb["fitness"] and pa["uids"] == pb["uids"]
    assert all(torch.equal(x, y) for x, y in zip(pa["scales"], pb["scales"], strict=True))
    assert sa["rng"] == sb["rng"] and sa["evaluations"] == sb["evaluations"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_vit_checkpoint) -> Path:
    """An uninterrupted search; its run folder is read, never written, by the tests below."""
    root = tmp_path_factory.mktemp("reference")
    cli_main(run_args(root, tiny_vit_checkpoint, "--trainer.logger.init_args.version", "ref"))
    assert load(root / "evolq" / "ref" / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    return root


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # many threads on few shared cores slow calibration ~50x


# -- exact resume after SIGKILL ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_fit_ckpt_path_last_ends_bitwise_identical(tmp_path, tiny_vit_checkpoint, reference):
    last = tmp_path / "evolq" / "version_0" / "checkpoints" / "last.ckpt"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "cli.py", *run_args(tmp_path, tiny_vit_checkpoint)], cwd=ROOT,
                                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if last.is_file():  # held still while its checkpoint is read, so a loaded machine cannot let it
                    proc.send_signal(signal.SIGSTOP)  # run to the end between the read and the kill
                    if load(last)["global_step"] >= 2:  # atomic saves: never a half-written file
                        proc.send_signal(signal.SIGKILL)
                        break
                    proc.send_signal(signal.SIGCONT)
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    killed_at = load(last)["global_step"]
    assert 2 <= killed_at < STEPS

    resumed = cli_main(run_args(tmp_path, tiny_vit_checkpoint, "--ckpt_path", "last"))
    assert resumed.trainer.ckpt_path == str(last)  # found in the killed run's folder, not a fresh version_1
    assert sorted(p.name for p in (tmp_path / "evolq").iterdir()) == ["version_0"]
    assert_same_search(load(last), load(reference / "evolq" / "ref" / "checkpoints" / "last.ckpt"))


# -- determinism ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_scales_and_fitness_trace_another_seed_does_not(tmp_path, tiny_vit_checkpoint,
                                                                               reference):
    cli_main(run_args(tmp_path, tiny_vit_checkpoint, "--trainer.logger.init_args.version", "again"))
    cli_main(run_args(tmp_path, tiny_vit_checkpoint, "--trainer.logger.init_args.version", "other", seed=4))
    ref, again, other = reference / "evolq" / "ref", tmp_path / "evolq" / "again", tmp_path / "evolq" / "other"
    assert_same_search(load(again / "checkpoints" / "last.ckpt"), load(ref / "checkpoints" / "last.ckpt"))
    for tag in ("search/child_fitness", "search/best_fitness", "search/accepted"):
        assert scalars(again, tag) == scalars(ref, tag), tag
    assert len(scalars(ref, "search/child_fitness")) == STEPS
    assert scalars(other, "search/child_fitness") != scalars(ref, "search/child_fitness")
    a, b = load(other / "checkpoints" / "last.ckpt")["state_dict"], load(ref / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


# -- checkpoint files: atomic replace, full disk -------------------------------------------------------------------


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    """A real write error from the OS (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) half-way through a save."""
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(8)}, target)
    before = target.read_bytes()
    stale = tmp_path / ".last.ckpt.999999.tmp"  # what a save killed before its os.replace leaves behind
    stale.write_bytes(before[:100])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(OSError) as failed:
            io.save_checkpoint({"global_step": 2, "w": torch.ones(1 << 18)}, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert failed.value.errno == errno.EFBIG
    assert target.read_bytes() == before
    assert temp_files(target) == [stale]  # its own temp file is gone; the stale one is not a checkpoint
    io.save_checkpoint({"global_step": 2, "w": torch.ones(8)}, target)
    assert io.load_checkpoint(target)["global_step"] == 2 and temp_files(target) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 112 KiB tmpfs: room for one checkpoint of the tiny search, not for a second copy while replacing it."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=112k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE test covers the same write failure")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_which_still_resumes_exactly(tmp_path, small_tmpfs,
                                                                            tiny_vit_checkpoint, reference):
    with pytest.raises(OSError) as full:
        cli_main(run_args(tmp_path, tiny_vit_checkpoint, "--checkpoint.dirpath", str(small_tmpfs)))
    assert full.value.errno == errno.ENOSPC
    survivor = small_tmpfs / "last.ckpt"
    assert load(survivor)["global_step"] == 1 and temp_files(survivor) == []
    resumed = tmp_path / "resumed"
    cli_main(run_args(tmp_path, tiny_vit_checkpoint, "--ckpt_path", str(survivor),
                      "--checkpoint.dirpath", str(resumed)))
    assert_same_search(load(resumed / "last.ckpt"), load(reference / "evolq" / "ref" / "checkpoints" / "last.ckpt"))


# -- a candidate with a non-finite fitness -------------------------------------------------------------------------


def test_nonfinite_candidates_are_rejected_and_the_search_goes_on(tmp_path, tiny_vit_checkpoint):
    # eps=1e39 pushes mutated scales past float32's range: inf scales -> NaN weights -> NaN fitness
    with pytest.warns(UserWarning, match=r"a candidate's fitness is nan; it is rejected"):
        cli = cli_main(run_args(tmp_path, tiny_vit_checkpoint, "--model.eps", "1e39", "--model.num_passes", "1",
                                "--trainer.logger.init_args.version", "nan"))
    run = tmp_path / "evolq" / "nan"
    assert scalars(run, "search/rejected_nonfinite") == [1.0] * 6  # every generation of the 3 blocks x 2
    assert scalars(run, "search/accepted") == [0.0] * 6
    saved = load(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 6
    assert cli.model.current_fitness == cli.model.baseline_fitness and math.isfinite(cli.model.current_fitness)
    assert all(torch.isfinite(s).all() for s in saved["evolq"]["search"]["strategy"]["population"]["scales"])
    assert all(torch.isfinite(v).all() for k, v in saved["state_dict"].items() if v.is_floating_point())


def test_a_nonfinite_baseline_fitness_stops_the_search_before_it_drifts(tmp_path, tiny_vit_checkpoint):
    # finite head weights so large that the logits overflow: with no finite fitness to beat, every candidate would
    # be rejected while tournaments still replace members, and the scales would drift with no selection at all
    saved = torch.load(tiny_vit_checkpoint, map_location="cpu", weights_only=True)
    saved["state_dict"]["head.weight"] *= 1e38
    broken = tmp_path / "huge_head.pth"
    torch.save(saved, broken)
    with pytest.raises(RuntimeError, match=r"fitness on the calibration set is nan.*fused: false"):
        cli_main(run_args(tmp_path, str(broken), "--trainer.logger.init_args.version", "nan_head"))
    assert not list((tmp_path / "evolq" / "nan_head").rglob("*.ckpt"))  # no checkpoint of a search that never ran


# -- bad input: a clear message, and the run already on disk keeps every byte --------------------------------------


def _image_tree(root: Path, empty_class: bool) -> Path:
    """root/{train,val}/{c0,c1}/ with real demo images; train/c1 also holds a zero-byte 'image'."""
    with np.load(DEMO_SET) as npz:
        images = npz["train_images"][:8]
    for split, count in (("train", 2), ("val", 1)):
        for c, cls in enumerate(("c0", "c1")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for n in range(count):
                Image.fromarray(images[c * 4 + n]).save(folder / f"{n}.png")
    (root / "train" / "c1" / "broken.png").write_bytes(b"")
    if empty_class:
        (root / "train" / "c2").mkdir()
        (root / "val" / "c2").mkdir()
    return root


def _image_data(root: Path) -> tuple[str, ...]:
    return ("--data", "evolq_pl.data.ImageNetDataModule", "--data.root", str(root), "--data.input_size", "[1,28,28]",
            "--data.interpolation", "bilinear", "--data.crop_pct", "1.0", "--data.mean", "[0.5]", "--data.std", "[0.5]",
            "--data.calib_size", "5", "--data.batch_size", "5")


BAD_MODEL = {
    "unknown model": (["--model.model_name", "vit_nonexistent_patch7"], ValueError, "unknown model"),
    "unsupported bits": (["--model.w_bits", "9"], ValueError, "w_bits=9 is not supported"),
    "unknown strategy": (["--model.strategy", "cma"], ValueError, "unknown search strategy 'cma': choose one of cmaes, evolq"),
    "zero population": (["--model.population_size", "0"], ValueError, "population_size must be an integer >= 1"),
    "zero cycles": (["--model.num_cycles", "0"], ValueError, "num_cycles must be an integer >= 1"),
    "negative passes": (["--model.num_passes", "-1"], ValueError, "num_passes must be an integer >= 1"),
    "zero temperature": (["--model.temperature", "0"], ValueError, "temperature must be > 0"),
    "negative temperature": (["--model.temperature", "-2"], ValueError, "temperature must be > 0"),
    "other bits": (["--model.w_bits", "4"], ValueError, r"another run: .*w_bits=3.*w_bits=4"),
    "other preset": (["--model.preset", "fq_vit"], ValueError, r"another run: .*preset='e2e'"),
    "other model": (["--model.model_name", "vit_small_patch16_224"], ValueError, r"another run: .*model_name"),
    "other search settings": (["--model.population_size", "5"], ValueError,
                              r"cannot resume: the search settings changed \{'population_size': \(4, 5\)\}"),
    "other calibration batches": (["--data.batch_size", "32"], ValueError,
                                  r"search settings changed \{'data.batch_size': \(16, 32\)\}"),
}


@pytest.mark.parametrize("case", BAD_MODEL)
def test_bad_model_or_foreign_checkpoint_is_refused_before_anything_is_written(case, tmp_path, reference,
                                                                              tiny_vit_checkpoint):
    runs = shutil.copytree(reference, tmp_path / "runs")
    before = snapshot(runs)
    extra, error, message = BAD_MODEL[case]
    with pytest.raises(error, match=message):
        cli_main(run_args(runs, tiny_vit_checkpoint, *extra, "--ckpt_path", "last"))
    assert snapshot(runs) == before


def test_bad_data_and_checkpoint_files_are_refused_before_anything_is_written(tmp_path, reference,
                                                                             tiny_vit_checkpoint):
    runs = shutil.copytree(reference, tmp_path / "runs")
    before = snapshot(runs)
    last = runs / "evolq" / "ref" / "checkpoints" / "last.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    demo = ("--data", "evolq_pl.data.DemoDataModule", "--data.batch_size", "16", "--data.heldout_size", "0")
    cases = [
        ((), ["--data", "evolq_pl.data.FashionMNISTDataModule", "--data.root", str(tmp_path / "absent")],
         ValueError, r"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz not found in .*absent"),
        (_image_data(tmp_path / "absent"), [], ValueError, r"ImageNet root .*absent does not exist"),
        (_image_data(_image_tree(tmp_path / "broken", empty_class=False)), [], ValueError,
         r"cannot read image .*broken\.png .*on_bad_image='skip'"),
        (_image_data(_image_tree(tmp_path / "empty", empty_class=True)), [], ValueError,
         r"class folder .*c2 holds no images"),
        ((*demo, "--data.calib_size", "5000"), [], ValueError, r"train split has 4000 items but calib_size"),
        ((), ["--ckpt_path", str(tmp_path / "absent.ckpt")], FileNotFoundError, r"absent\.ckpt' does not exist"),
        ((), ["--ckpt_path", str(cut)], ValueError, r"cut\.ckpt' is truncated or not a PyTorch checkpoint"),
        ((), ["--ckpt_path", tiny_vit_checkpoint], ValueError, "not an evolq-pl checkpoint"),
        # a file path must not let the checkpoint's hyperparameters quietly replace the given ones (LightningCLI does)
        ((), ["--ckpt_path", str(last), "--model.w_bits", "4"], ValueError, r"another run: .*w_bits=3.*w_bits=4"),
    ]
    for data, extra, error, message in cases:
        with pytest.raises(error, match=message) as refused:
            cli_main(run_args(runs, tiny_vit_checkpoint, *extra, data=data or None))
        assert "\n" not in str(refused.value), str(refused.value)
        assert snapshot(runs) == before, message
        assert not (runs / "evolq" / "version_0").exists()  # not even an empty run folder


def test_unknown_config_key_is_refused_before_anything_is_written(tmp_path, reference, tiny_vit_checkpoint, capsys):
    runs = shutil.copytree(reference, tmp_path / "runs")
    before = snapshot(runs)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(run_args(runs, tiny_vit_checkpoint, "--model.num_cylces", "2", "--ckpt_path", "last"))
    assert exit_info.value.code != 0
    assert "num_cylces" in capsys.readouterr().err
    assert snapshot(runs) == before
