"""EvolQTrainer: Lightning's Trainer with the project's own verbs beside fit/validate/test.

LightningCLI turns every method named in ``EvolQCLI.subcommands()`` into a subcommand whose options come from the
method's signature, so a verb added here (its name in ``VERBS``) is at once ``python cli.py <verb> --config ...``
with the same config, model and data module as ``fit``. Each verb only delegates to the module that owns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch import Trainer

from evolq_pl.checkpoint_io import AtomicCheckpointIO
from evolq_pl.quant.modes import calibrate, set_quantized

if TYPE_CHECKING:
    from evolq_pl.data import CalibrationDataModule
    from evolq_pl.models.base import QuantizedModel
    from evolq_pl.module import EvolQModule


class EvolQTrainer(Trainer):
    """A Trainer whose extra verbs (``VERBS``) LightningCLI offers as subcommands."""

    VERBS: tuple[str, ...] = ("export", "landscape")

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
        from evolq_pl.landscape import landscape_command

        return landscape_command(self, model, datamodule, ckpt_path, block, directions, surface, seed, points,
                                 min_step, max_step, spacing, heldout)

    def export(self, model: EvolQModule, datamodule: CalibrationDataModule | None = None,
               ckpt_path: str | None = None, output: str | None = None) -> None:
        """Write the searched model of ``ckpt_path`` (without it: the calibrated baseline) as an integer QDQ ONNX
        graph that ONNX Runtime runs (model.onnx) and a runtime-neutral record (quantized.safetensors/.json).

        Args:
            ckpt_path: a last.ckpt of ``fit`` with this config; omitted: calibrate on the config's data and export
                the baseline.
            output: folder to write (replaced whole if it holds an earlier export); default: ``export/`` in the
                checkpoint's run folder, or ``exports/<model>_w<W>a<A>_baseline``.
        """
        from evolq_pl.export.command import export_command

        export_command(model, datamodule, ckpt_path, output)


def quantized_model_for(model: EvolQModule, datamodule: CalibrationDataModule | None,
                        ckpt_path: str | None) -> tuple[QuantizedModel, str]:
    """The quantized model a verb works on, and what it is: the searched scales of ``ckpt_path`` (checked against
    the config as ``test`` checks it), or without a checkpoint the baseline calibrated on the config's calibration
    set."""
    qmodel = model.qmodel
    if ckpt_path:
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)
        state = model.check_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        model.apply_heldout_selection(state)
        set_quantized(qmodel, True)
        return qmodel, f"searched checkpoint {ckpt_path}"
    if datamodule is None:
        raise ValueError("without --ckpt_path the baseline is calibrated on the config's data: give a data: section")
    datamodule.setup("fit")
    batches = [batch[0] if isinstance(batch, list | tuple) else batch for batch in datamodule.calib_dataloader()]
    calibrate(qmodel, batches, fit_on=qmodel.qconfig.fit_on)
    return qmodel, f"calibrated baseline (no --ckpt_path; {sum(len(b) for b in batches)} calibration images)"
