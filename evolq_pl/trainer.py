"""EvolQTrainer: Lightning's Trainer with the project's own verbs beside fit/validate/test.

LightningCLI turns every method named in ``EvolQCLI.subcommands()`` into a subcommand whose options come from the
method's signature, so a verb added here (its name in ``VERBS``) is at once ``python cli.py <verb> --config ...``
with the same config, model and data module as ``fit``. Each verb only delegates to the module that owns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from evolq_pl.checkpoint_io import AtomicCheckpointIO
from evolq_pl.fitness import get_fitness
from evolq_pl.quant.modes import calibrate, set_quantized

if TYPE_CHECKING:
    from evolq_pl.data import CalibrationDataModule
    from evolq_pl.models.base import QuantizedModel
    from evolq_pl.module import EvolQModule


class EvolQTrainer(Trainer):
    """A Trainer whose extra verbs (``VERBS``) LightningCLI offers as subcommands."""

    VERBS: tuple[str, ...] = ("landscape",)

    def landscape(self, model: EvolQModule, datamodule: CalibrationDataModule | None = None,
                  ckpt_path: str | None = None, block: int | None = None, directions: int = 2, surface: bool = False,
                  seed: int = 0, points: int = 13, min_step: float = 1e-4, max_step: float = 0.1,
                  spacing: Literal["log", "linear"] = "log", heldout: bool = True) -> dict[str, Any]:
        """Draw the fitness landscape of one block's weight scales (evolq_pl.landscape): the configured fitness
        against the FP teacher on the calibration set, and the held-out top-1 where the data has a held-out split,
        at scales * (1 + t d) along seeded random directions d; writes landscape_block<B>.csv and PNGs to the run
        folder and the figures to TensorBoard, and prints a roughness figure.

        Args:
            model: the config's model; its fitness, temperature and teacher settings are the search's.
            datamodule: the config's data: calibration batches (and the held-out split).
            ckpt_path: a last.ckpt written by fit (the searched scales); without it, the calibrated baseline.
            block: index of the search block whose scales move (0 = the first block).
            directions: how many random directions, each drawn as a line through the model's scales.
            surface: also score every pair of steps of the two directions (``--directions 2``; len(steps)² points).
            seed: seed of the random directions (the same seed gives the same directions for any checkpoint).
            points: steps of each sign (13: four per decade from 1e-4 to 1e-1 with spacing log).
            min_step: smallest relative step of the log grid.
            max_step: largest relative step.
            spacing: log (symmetric log grid) or linear (evenly spaced up to max_step, a zoom).
            heldout: also measure the held-out top-1 at every point (when the data has heldout_size > 0).
        """
        from evolq_pl.landscape import SuffixScorer, grid_points, save_figures, step_grid, sweep, write_csv
        from evolq_pl.search.scales import ScaleVector

        blocks = model.qmodel.search_blocks(include_mlp=model.hparams.search_mlp)
        if block is None or not 0 <= block < len(blocks):
            raise ValueError(f"--block {block}: give the index of a search block, 0 to {len(blocks) - 1} "
                             f"({len(blocks)} blocks in {model.hparams.model_name})")
        steps = step_grid(points, min_step, max_step, spacing)
        if directions < 1 or (surface and directions != 2):
            raise ValueError(f"--directions {directions}: give 1 or more lines, or 2 with --surface true")
        if datamodule is None:
            raise ValueError("the landscape scores the calibration set: give the config a data: section")
        fitness_fn = get_fitness(model.hparams.fitness, model.hparams.temperature)
        qmodel, what = quantized_model_for(model, datamodule, ckpt_path)
        datamodule.setup("fit")
        qmodel.to(self.strategy.root_device)
        scorer = SuffixScorer(qmodel, block, datamodule.calib_dataloader(), fitness_fn,
                              datamodule.val_dataloader() if heldout else (), self.strategy.root_device,
                              int_ln_teacher=model.hparams.teacher == "int_ln",
                              context=self.precision_plugin.train_step_context)
        rank_zero_info(f"landscape of {blocks[block].name} ({what}): "
                       f"{len(grid_points(steps, directions, surface))} points")
        result = sweep(ScaleVector(blocks[block].layers), scorer, steps, directions, surface, seed)
        result.title = (f"{model.hparams.model_name} W{model.qconfig.w_bits}A{model.qconfig.a_bits}, "
                        f"{blocks[block].name} ({'searched' if ckpt_path else 'calibrated baseline'}), seed {seed}")
        out = Path(self.log_dir or self.default_root_dir)
        csv_path = write_csv(result, out / f"landscape_block{block}.csv")
        figures = save_figures(result, out / f"landscape_block{block}", model.hparams.fitness)
        if isinstance(self.logger, TensorBoardLogger):
            for kind, fig in figures.items():
                self.logger.experiment.add_figure(f"landscape/block{block}_{kind}", fig, close=False)
            self.logger.experiment.flush()
        rank_zero_info(f"landscape of {blocks[block].name}: {result.summary()}; {csv_path} and PNGs")
        return {"csv": str(csv_path), "fitness_at_0": result.value([0.0] * directions), "summary": result.summary()}


def quantized_model_for(model: EvolQModule, datamodule: CalibrationDataModule | None,
                        ckpt_path: str | None) -> tuple[QuantizedModel, str]:
    """The quantized model a verb works on, and what it is: the searched scales of ``ckpt_path`` (checked against
    the config as ``test`` checks it), or without a checkpoint the baseline calibrated on the config's calibration
    set."""
    qmodel = model.qmodel
    if ckpt_path:
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)
        model.check_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        set_quantized(qmodel, True)
        return qmodel, f"searched checkpoint {ckpt_path}"
    if datamodule is None:
        raise ValueError("without --ckpt_path the baseline is calibrated on the config's data: give a data: section")
    datamodule.setup("fit")
    batches = [batch[0] if isinstance(batch, list | tuple) else batch for batch in datamodule.calib_dataloader()]
    calibrate(qmodel, batches, fit_on=qmodel.qconfig.fit_on)
    return qmodel, f"calibrated baseline (no --ckpt_path; {sum(len(b) for b in batches)} calibration images)"
