"""pyproject.toml declares what the package imports, nothing it does not, and the ``evolq`` command."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# used without an import of ours: LightningCLI parses with jsonargparse, the CLI's default logger is TensorBoard's
PLUGINS = {"jsonargparse": "LightningCLI's parser", "tensorboard": "the CLI's default logger"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported_distributions(*folders: str) -> set[str]:
    """Distributions that provide the third-party modules imported by the .py files under ``folders``."""
    modules = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    providers = packages_distributions()
    ours = {p.stem for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"}  # evolq_pl, cli, tests, ...
    ours |= {p.stem for p in (ROOT / "scripts").glob("*.py")}  # scripts run from their folder import each other
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in ours}
    missing = sorted(m for m in third_party if m not in providers)
    assert not missing, f"no installed distribution provides {missing}"
    return {_name(d) for m in third_party for d in providers[m]}


def test_every_imported_package_is_declared_and_every_declared_one_is_used():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    used = imported_distributions("evolq_pl", "benchmarks", "scripts")
    assert used - declared == set(), "imported but not in pyproject.toml's dependencies"
    assert declared - used - set(PLUGINS) == set(), "declared but imported nowhere"
    assert imported_distributions("tests") - declared - {_name(r) for r in PROJECT["optional-dependencies"]["dev"]} \
        == set(), "the tests import something the dev extra does not install"


def test_the_evolq_command_runs_the_cli(capsys):
    module, _, function = PROJECT["scripts"]["evolq"].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "demo", "--print_config"])
    assert done.value.code == 0
    assert "levit_128s" in capsys.readouterr().out


def test_requirements_txt_installs_the_project_with_its_test_tools():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines == ["-e .[dev]"]
