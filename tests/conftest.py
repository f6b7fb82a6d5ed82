"""Shared test set-up: one intra-op thread (the test machines have few cores, shared with other jobs)."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory):
    """A 3-block ViT trained for eight epochs on the shipped demo images (a real, non-degenerate model)."""
    from evolq_pl.testing import train_tiny_vit

    return str(train_tiny_vit(tmp_path_factory.mktemp("tiny") / "tiny_vit.pth"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)"))])
def device(request) -> torch.device:
    """The devices a bit-for-bit check runs on: the CPU always, a CUDA GPU where there is one."""
    return torch.device(request.param)


def tiny_run_args(save_dir, ckpt: str) -> list[str]:
    """A tiny ViT at W3A8 through the CLI: 3 blocks x 1 pass x 2 generations, 64 calibration and 64 held-out images
    (validated after every visit; the best held-out scales are kept), the progress bar on, as a user's fit has it."""
    return ["--model.model_name", "vit_tiny_patch16_224", "--model.checkpoint_path", ckpt, "--model.w_bits", "3",
            "--model.num_passes", "1", "--model.population_size", "4", "--model.tournament_size", "3",
            "--model.num_cycles", "2", "--model.selection", "heldout", "--data", "evolq_pl.data.DemoDataModule", "--data.calib_size", "64",
            "--data.heldout_size", "64", "--data.batch_size", "32", "--data.test_batch_size", "32",
            "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(save_dir)]


@pytest.fixture(scope="session")
def resumed_tiny_search(tmp_path_factory, tiny_vit_checkpoint):
    """`cli.py fit` of :func:`tiny_run_args` stopped after its first block visit, then resumed with --ckpt_path last.

    Returns (args, {"stopped"|"resumed": (the CLI object, what the run wrote to stdout)}); the run folder is
    ``<save_dir>/evolq/version_0``.
    """
    import contextlib
    import io

    from evolq_pl.cli import cli_main

    args = tiny_run_args(tmp_path_factory.mktemp("resumed_search"), tiny_vit_checkpoint)
    runs = {}
    for name, extra in (("stopped", ["--trainer.max_epochs", "1"]), ("resumed", ["--ckpt_path", "last"])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli = cli_main(["fit", *args, *extra])
        runs[name] = (cli, out.getvalue())
    return args, runs
