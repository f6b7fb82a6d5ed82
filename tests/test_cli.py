"""cli.py end to end: configs parse, fit writes checkpoints and TensorBoard scalars, test writes its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main
from evolq_pl.module import EvolQModule
from evolq_pl.testing import TINY_VIT_KWARGS, TINY_VIT_NAME

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "model_name" in capsys.readouterr().out


@pytest.mark.parametrize("config", [c for c in CONFIGS if "checkpoint_path: checkpoints/" in c.read_text()],
                         ids=lambda p: p.name)
def test_every_config_of_a_shipped_checkpoint_builds_its_search(config, monkeypatch):
    """Beyond parsing: the model section builds its module, so its strategy options and units fit together (a
    strategy option naming a unit the search lacks is refused only there)."""
    monkeypatch.chdir(config.parents[1])  # the configs name the shipped checkpoints from the repository root
    module = EvolQModule(**yaml.safe_load(config.read_text())["model"])
    assert module.engine.num_visits >= 1 and module.engine.names == [b.name for b in module.blocks]


@pytest.mark.parametrize("name", ["w4_vit_base.yaml", "w4_vit_base"])
def test_bare_config_name_resolves_to_the_shipped_configs(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: the name alone must find configs/
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", name, "--print_config"])
    assert exit_info.value.code == 0
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in capsys.readouterr().out


def test_a_path_wins_over_a_shipped_config_name(tmp_path, monkeypatch, capsys):
    (tmp_path / "w4_vit_base.yaml").write_text("model:\n  model_name: deit_small_patch16_224.fb_in1k\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config=w4_vit_base.yaml", "--print_config"])
    assert "deit_small_patch16_224.fb_in1k" in capsys.readouterr().out


def test_unknown_config_name_lists_the_shipped_configs():
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["test", "--config", "w5_vit_base.yaml"])
    message = str(exit_info.value.code)
    assert "w5_vit_base.yaml" in message and "w4_vit_base.yaml" in message and "demo.yaml" in message


def test_unknown_config_key_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS[0]), "--model.population_sise", "3", "--print_config"])
    assert exit_info.value.code != 0
    assert "population_sise" in capsys.readouterr().err


@torch.no_grad()
def correct_percent(model: torch.nn.Module, data) -> float:
    """100 x correct / images over the data module's test split, counted by hand."""
    model.eval()
    hits = total = 0
    for x, y in data.test_dataloader():
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / total


def run_args(tmp_path: Path, ckpt: str, version: str) -> list[str]:
    return [
        "--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path", ckpt,
        "--model.w_bits", "3", "--model.num_passes", "1", "--model.population_size", "4",
        "--model.tournament_size", "3", "--model.num_cycles", "2",
        "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64", "--data.heldout_size", "64",
        "--data.batch_size", "32",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.version", version,
    ]


def test_fit_then_test_through_the_cli(tmp_path, tiny_vit_checkpoint):
    cli_main(["fit", *run_args(tmp_path, tiny_vit_checkpoint, "fit")])
    run = tmp_path / "evolq" / "fit"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert (run / "quant_map.txt").read_text().count("weight") >= 3 * 4 + 2

    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("search/best_fitness", "search/mean_fitness", "search/accepted", "search/sec_per_generation",
                "search/evaluations", "visit/fitness_before", "visit/fitness_after", "visit/rel_scale_change",
                "heldout/top1"):
        assert tag in scalars, tag
    assert len(events.Scalars("search/best_fitness")) == 3 * 2  # blocks x generations
    assert [s.value for s in events.Scalars("search/evaluations")] == [2, 3, 4, 5, 6, 7]  # the baseline, children

    tested = cli_main(["test", *run_args(tmp_path, tiny_vit_checkpoint, "test"), "--ckpt_path", str(last)])
    results = json.loads((tmp_path / "evolq" / "test" / "test_results.json").read_text())
    assert results["evaluated"] == "quantized" and results["w_bits"] == 3 and results["ckpt"] == str(last)
    assert 0 <= results["top5"] <= 100 and results["top1"] <= results["top5"]
    # the reported top-1 is the count of correct test images under the checkpoint's scales
    saved = torch.load(last, weights_only=False)["state_dict"]
    held = tested.model.state_dict()
    assert all(torch.equal(held[k], v) for k, v in saved.items())
    assert results["top1"] == pytest.approx(correct_percent(tested.model.qmodel, tested.datamodule), abs=1e-4)  # float32 metric

    cli_main(["test", *run_args(tmp_path, tiny_vit_checkpoint, "fp"), "--model.eval_fp", "true"])
    fp = json.loads((tmp_path / "evolq" / "fp" / "test_results.json").read_text())
    assert fp["evaluated"] == "fp" and fp["ckpt"] is None
    plain = timm.create_model(TINY_VIT_NAME, pretrained=False, **TINY_VIT_KWARGS).eval()
    plain.load_state_dict(torch.load(tiny_vit_checkpoint, weights_only=True)["state_dict"])
    assert fp["top1"] == pytest.approx(correct_percent(plain, tested.datamodule), abs=0.051)  # one image of 2000


def test_test_and_validate_of_the_calibrated_baseline(tmp_path, tiny_vit_checkpoint):
    """Without a checkpoint, test and validate measure the calibrated model; top-1 is a count of correct images."""
    tested = cli_main(["test", *run_args(tmp_path, tiny_vit_checkpoint, "base")])
    results = json.loads((tmp_path / "evolq" / "base" / "test_results.json").read_text())
    assert results["scales"] == "baseline" and results["ckpt"] is None and results["evaluated"] == "quantized"
    assert results["top1"] == pytest.approx(correct_percent(tested.model.qmodel, tested.datamodule), abs=1e-4)

    validated = cli_main(["validate", *run_args(tmp_path, tiny_vit_checkpoint, "val")])
    top1 = float(validated.trainer.callback_metrics["heldout/top1"])
    model, data = validated.model.qmodel.eval(), validated.datamodule
    hits = total = 0
    with torch.no_grad():
        for x, y in data.val_dataloader():  # the 64 held-out train images, never the test split
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 64 and top1 == pytest.approx(100.0 * hits / total, abs=1e-4)
    assert data.test_set is None
    # both calibrated the same 64 images with the same seed: the same model
    assert all(torch.equal(a, b) for a, b in zip(tested.model.state_dict().values(),
                                                 validated.model.state_dict().values(), strict=True))
