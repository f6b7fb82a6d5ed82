"""The landscape tool: its grid and roughness figure, and `cli.py landscape` on a small trained ViT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import cli_main
from evolq_pl.data import DemoDataModule
from evolq_pl.fitness import get_fitness
from evolq_pl.landscape import grid_points, main, random_directions, read_csv, roughness, step_grid
from evolq_pl.module import EvolQModule
from evolq_pl.quant.modes import calibrate, quantization_disabled

# -- the grid, the directions, the roughness figure ------------------------------------------------------------


def test_log_grid_runs_from_1e_4_to_1e_1_with_both_signs_and_zero():
    steps = step_grid()
    assert len(steps) == 27 and steps == sorted(steps) and steps[13] == 0.0
    assert steps[14] == pytest.approx(1e-4) and steps[-1] == pytest.approx(1e-1)
    assert steps[:13] == [-t for t in reversed(steps[14:])]
    assert steps[14 + 4] == pytest.approx(1e-3)  # four per decade
    assert step_grid(4, max_step=0.02, spacing="linear")[5:] == pytest.approx([0.005, 0.01, 0.015, 0.02])


def test_bad_grid_is_refused():
    with pytest.raises(ValueError, match="0 < min_step < max_step < 1"):
        step_grid(min_step=0.1, max_step=0.01)
    with pytest.raises(ValueError, match="at least 1 step"):
        step_grid(0)


def test_lines_share_step_zero_and_a_surface_takes_every_pair():
    steps = step_grid(2)
    lines = grid_points(steps, 3)
    assert len(lines) == 1 + 3 * 4 and lines[0] == (0.0, 0.0, 0.0)
    assert all(sum(t != 0.0 for t in p) == 1 for p in lines[1:])
    assert len(set(grid_points(steps, 2, surface=True))) == 25
    with pytest.raises(ValueError, match="two directions"):
        grid_points(steps, 3, surface=True)


def test_random_directions_are_seeded_and_unit_rms():
    a, b = random_directions(300, 2, seed=3), random_directions(300, 2, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_directions(300, 2, seed=4))
    assert a.pow(2).mean(dim=1).sqrt() == pytest.approx([1.0, 1.0])
    assert abs(float(a[0] @ a[1])) / 300 < 0.2  # two directions, not one


def test_roughness_counts_minima_and_turns():
    valley = roughness([3.0, 2.0, 1.0, 2.0, 3.0], centre=2)
    assert (valley.local_minima, valley.tv_ratio) == (1, 1.0)  # monotone away from the model
    jagged = roughness([2.0, 0.0, 1.0, 0.5, 1.5, 1.0, 3.0], centre=3)
    # minima at 0.0, 0.5 and 1.0; left side 0.5 -> 1.0 -> 0.0 -> 2.0 (TV 3.5, net 1.5), right 0.5 -> 1.5 -> 1.0 -> 3.0
    assert jagged.local_minima == 3
    assert jagged.tv_ratio == pytest.approx((3.5 + 3.5) / (1.5 + 2.5))
    flat = roughness([1.0, 1.0, 1.0, 1.0, 1.0], centre=2)
    assert (flat.local_minima, flat.tv_ratio) == (0, 1.0)


# -- cli.py landscape on the trained 3-block ViT ------------------------------------------------------------


def _args(save_dir: Path, ckpt: str, *extra: str) -> list[str]:
    return ["--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path", ckpt, "--model.w_bits", "3",
            "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64", "--data.heldout_size", "64",
            "--data.batch_size", "32", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save_dir), *extra]


@torch.no_grad()
def test_landscape_at_step_zero_is_the_calibrated_models_fitness(tmp_path, tiny_vit_checkpoint, caplog):
    cli = cli_main(["landscape", *_args(tmp_path, tiny_vit_checkpoint, "--trainer.logger.init_args.version", "v"),
                    "--block", "1", "--directions", "2", "--surface", "true", "--points", "2"])
    run = tmp_path / "evolq" / "v"
    landscape = read_csv(run / "landscape_block1.csv")
    assert len(landscape.rows) == 5 * 5 and landscape.directions == 2 and landscape.surface

    # the same model and data built apart, scored with whole forward passes (not the tool's cached suffix)
    module = EvolQModule(model_name="vit_tiny_patch16_224", checkpoint_path=tiny_vit_checkpoint, w_bits=3)
    data = DemoDataModule(calib_size=64, heldout_size=64, batch_size=32)
    batches = [x for x, _ in data.calib_dataloader()]
    calibrate(module.qmodel, batches)
    infonce = get_fitness("infonce")
    scores = []
    for x in batches:
        with quantization_disabled(module.qmodel):
            teacher = module.qmodel(x)
        scores.append(float(infonce(module.qmodel(x), teacher)))
    held = [(module.qmodel(x).argmax(1) == y).float() for x, y in data.val_dataloader()]
    assert landscape.value((0.0, 0.0)) == pytest.approx(sum(scores) / len(scores), rel=1e-9, abs=0)
    assert landscape.value((0.0, 0.0), "heldout_top1") == pytest.approx(100 * float(torch.cat(held).mean()))
    assert len({r["fitness"] for r in landscape.rows}) > 5  # the scales did move

    # the sweep left the model's scales as they were
    for (name, q), (_, ref) in zip(cli.model.qmodel.named_buffers(), module.qmodel.named_buffers(), strict=True):
        if name.endswith("weight_quantizer.scale"):
            assert torch.equal(q, ref), name

    for kind in ("lines", "surface"):
        assert (run / f"landscape_block1_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"landscape/block1_lines", "landscape/block1_surface"} <= set(events.Tags()["images"])
    line = [m for m in caplog.messages if "local minima" in m]
    assert len(line) == 1 and "direction 0:" in line[0] and "direction 1:" in line[0]


def test_landscape_of_a_searched_checkpoint_starts_at_the_searched_fitness(tmp_path, tiny_vit_checkpoint):
    search = ["--model.num_passes", "1", "--model.population_size", "4", "--model.tournament_size", "3",
              "--model.num_cycles", "2", "--data.heldout_size", "0", "--trainer.logger.init_args.version", "fit"]
    cli_main(["fit", *_args(tmp_path, tiny_vit_checkpoint, *search)])
    events = EventAccumulator(str(tmp_path / "evolq" / "fit"))
    events.Reload()
    searched = events.Scalars("visit/fitness_after")[-1].value  # the last visit: the searched model's fitness
    last = tmp_path / "evolq" / "fit" / "checkpoints" / "last.ckpt"
    cli_main(["landscape", *_args(tmp_path, tiny_vit_checkpoint, "--data.heldout_size", "0",
                                  "--trainer.logger.init_args.version", "after"),
              "--ckpt_path", str(last), "--block", "2", "--directions", "1", "--points", "1"])
    landscape = read_csv(tmp_path / "evolq" / "after" / "landscape_block2.csv")
    assert sorted(r["step_0"] for r in landscape.rows) == [-0.1, 0.0, 0.1]
    assert landscape.value((0.0,)) == pytest.approx(searched, rel=1e-6)  # TensorBoard stores float32
    assert not landscape.has_heldout
    assert math.isfinite(landscape.roughness(0).tv_ratio)


@pytest.mark.parametrize("block", [["--block", "3"], ["--block", "-1"], []])
def test_bad_block_is_a_one_line_error_before_anything_is_written(block, tmp_path, tiny_vit_checkpoint):
    with pytest.raises(ValueError, match=r"give the index of a search block, 0 to 2 \(3 blocks") as refused:
        cli_main(["landscape", *_args(tmp_path, tiny_vit_checkpoint), *block])
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "evolq").exists()


def test_python_m_evolq_pl_landscape_takes_the_same_arguments(tmp_path, tiny_vit_checkpoint):
    with pytest.raises(ValueError, match=r"--block 7: give the index"):
        main([*_args(tmp_path, tiny_vit_checkpoint), "--block", "7"])
