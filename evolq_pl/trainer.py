"""EvolQTrainer: Lightning's Trainer with the project's own verbs beside fit/validate/test.

LightningCLI turns every method named in ``EvolQCLI.subcommands()`` into a subcommand whose options come from the
method's signature, so a verb added here (its name in ``VERBS``) is at once ``python cli.py <verb> --config ...``
with the same config, model and data module as ``fit``. Each verb only delegates to the module that owns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch import Trainer

from evolq_pl.checkpoint_io import AtomicCheckpointIO
from evolq_pl.quant.modes import calibrate, set_quantized

if TYPE_CHECKING:
    from evolq_pl.data import CalibrationDataModule
    from evolq_pl.models.base import QuantizedModel
    from evolq_pl.module import EvolQModule


class EvolQTrainer(Trainer):
    """A Trainer whose extra verbs (``VERBS``) LightningCLI offers as subcommands."""

    VERBS: tuple[str, ...] = ("export",)

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
