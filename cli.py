"""evolq-pl command line: ``python cli.py fit|validate|test --config configs/<run>.yaml``."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from evolq_pl.data import CalibrationDataModule
from evolq_pl.module import EvolQModule


class EvolQCLI(LightningCLI):
    """LightningCLI with the search's defaults: no optimizer, a checkpoint after every generation."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "trainer.inference_mode": False,
            "trainer.num_sanity_val_steps": 0,
            "trainer.log_every_n_steps": 1,
            "trainer.logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "evolq"},
            },
        })
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 0,
            "checkpoint.every_n_train_steps": 1,
        })

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: kwargs for name, kwargs in LightningCLI.subcommands().items()
                if name in ("fit", "validate", "test")}


def cli_main(args=None) -> EvolQCLI:
    return EvolQCLI(
        EvolQModule,
        CalibrationDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    cli_main()
