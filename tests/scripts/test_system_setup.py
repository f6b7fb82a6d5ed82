"""scripts/system_setup.sh, the system step of `make demo` and `make test`, with a fake root and fake apt-get.

Nothing is installed or removed here: `id` and `apt-get` are stand-ins on PATH, the dataset folder and the
compiler are named through FASHION_MNIST_DIR and CXX, and the Makefile runs in a copy with a stand-in venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system_setup.sh"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def machine(tmp_path):
    """A fake machine: ``id`` says the uid in ``uid``, ``apt-get`` logs its arguments and (``installs``) puts the
    Fashion-MNIST files where the package would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = {"uid": "1000", "installs": True, "dataset": tmp_path / "fashion-mnist", "log": tmp_path / "apt.log"}
    _exe(bin_dir / "id", f'cat "{tmp_path}/uid"\n')
    files = " ".join(FILES)
    _exe(bin_dir / "apt-get", f'echo "$*" >> "{state["log"]}"\n'
         f'if [ "$1" = install ] && [ -f "{tmp_path}/installs" ]; then\n'
         f'  mkdir -p "$FASHION_MNIST_DIR" && for f in {files}; do : > "$FASHION_MNIST_DIR/$f"; done\nfi\n')

    def run(*needs: str, cxx: str = "sh", path: str | None = None, py: str = "python3", cmd: list[str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        (tmp_path / "uid").write_text(state["uid"] + "\n")
        (tmp_path / "installs").unlink(missing_ok=True)
        if state["installs"]:
            (tmp_path / "installs").touch()
        env = {**os.environ, "PATH": path or f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "FASHION_MNIST_DIR": str(state["dataset"]), "CXX": cxx, "PY": py}
        return subprocess.run(cmd or ["bash", str(SCRIPT), *needs], env=env, capture_output=True, text=True,
                              cwd=cwd, timeout=60)

    run.state, run.bin_dir = state, bin_dir
    return run


def _dataset(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        (folder / f).touch()


def test_nothing_missing_does_nothing(machine):
    _dataset(machine.state["dataset"])
    done = machine("dataset", "compiler")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not machine.state["log"].exists()


def test_not_root_gets_one_line_with_the_command_and_stops(machine):
    done = machine("dataset", "compiler", cxx="no-such-c++")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"missing Fashion-MNIST in {machine.state['dataset']}, a C++ compiler (no-such-c++)" in done.stderr
    assert "run: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist g++" in done.stderr
    assert not machine.state["log"].exists()


def test_root_installs_the_missing_packages_with_apt_get(machine):
    machine.state["uid"] = "0"
    done = machine("dataset", "compiler")
    assert done.returncode == 0, done.stderr
    assert machine.state["log"].read_text().splitlines() == [
        "update -qq", "install -y -qq --no-install-recommends dataset-fashion-mnist"]
    assert all((machine.state["dataset"] / f).is_file() for f in FILES)


def test_root_but_still_missing_after_apt_get_is_one_line(machine):
    machine.state["uid"], machine.state["installs"] = "0", False
    done = machine("dataset")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "still missing Fashion-MNIST" in done.stderr


def test_python_without_ensurepip_names_its_venv_package(machine, tmp_path):
    python = _exe(tmp_path / "python3", 'case "$2" in\n  *ensurepip*) exit 1 ;;\n  *"%d.%d"*) echo 3.11 ;;\nesac\n')
    done = machine("venv", py=str(python))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "ensurepip" in done.stderr and "sudo apt-get install -y python3.11-venv" in done.stderr


def test_too_old_python_is_one_line(machine, tmp_path):
    python = _exe(tmp_path / "python3", 'case "$2" in\n  *"%d.%d"*) echo 3.9 ;;\n  *) exit 1 ;;\nesac\n')
    done = machine("venv", py=str(python))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "is Python 3.9; evolq-pl needs 3.10+" in done.stderr


def test_without_apt_get_says_what_to_install(machine):
    machine.state["uid"] = "0"
    done = machine("dataset", path=str(machine.bin_dir.parent / "nothing"), cmd=["/bin/bash", str(SCRIPT), "dataset"])
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "without apt-get" in done.stderr and "dataset-fashion-mnist" in done.stderr


def test_unknown_need_is_a_usage_error(machine):
    done = machine("datset")
    assert done.returncode == 2 and "usage:" in done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_stops_before_the_tests_and_make_demo_needs_no_dataset(machine, tmp_path):
    """The Makefile runs the step first: a missing package stops `make test` before ruff and pytest."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("Makefile", "requirements.txt", "pyproject.toml", "scripts/system_setup.sh"):
        shutil.copy2(ROOT / name, repo / name)
    calls = tmp_path / "calls.log"
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for tool in ("python", "ruff"):
        _exe(venv_bin / tool, f'echo "{tool} $*" >> "{calls}"\n')
    (repo / ".venv" / ".installed").touch()  # newer than requirements.txt and pyproject.toml: no pip install

    stopped = machine(cmd=["make", "-s", "test"], cwd=repo)
    assert stopped.returncode != 0
    assert "run: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" in stopped.stderr
    assert not calls.exists()

    demo = machine(cmd=["make", "-s", "demo"], cwd=repo)
    assert demo.returncode == 0, demo.stderr
    assert calls.read_text().splitlines() == ["python scripts/demo.py"]

    _dataset(machine.state["dataset"])
    tested = machine(cmd=["make", "-s", "test"], cwd=repo)
    assert tested.returncode == 0, tested.stderr
    assert calls.read_text().splitlines()[1:] == ["ruff check .", "python -m pytest -q"]
