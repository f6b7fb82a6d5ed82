"""evolq-pl command line: ``python cli.py fit|validate|test|... --config <run>.yaml`` (or ``evolq ...``).

A bare config name (``w4_vit_base.yaml`` or ``w4_vit_base``) is looked up in the shipped ``configs/`` folder; a path
that exists always wins. Verbs beyond Lightning's (``export``, ...) are methods of :class:`EvolQTrainer`.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from evolq_pl.callbacks import CheckpointAfterHeldout, QuantMapFile, RunReport, TestResultsFile
from evolq_pl.checkpoint_io import AtomicCheckpointIO
from evolq_pl.console import quiet_lightning
from evolq_pl.data import CalibrationDataModule
from evolq_pl.module import EvolQModule
from evolq_pl.progress import SearchProgressBar
from evolq_pl.results import RESULTS_FILE, results_table
from evolq_pl.strategy import search_strategy_for
from evolq_pl.trainer import EvolQTrainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped in ``configs/``."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(value: str) -> str:
    """A ``--config`` value as a path: an existing file as given, else a shipped config of that name."""
    if Path(value).is_file():
        return value
    name = Path(value).name
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if Path(value).parent == Path(".") and candidate.is_file():
            return str(candidate)
    raise SystemExit(f"error: config '{value}' is neither a file nor a shipped config; shipped configs: "
                     f"{', '.join(shipped_configs())}")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config X`` / ``--config=X`` value resolved by :func:`resolve_config`."""
    out, args = [], list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += [arg, resolve_config(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def newest_last_checkpoint(folders: list[Path]) -> Path | None:
    """The most recently written last*.ckpt in ``folders`` (Lightning's rule for ``ckpt_path='last'``)."""
    found = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class EvolQCLI(LightningCLI):
    """LightningCLI with the search's defaults: one epoch per block visit, a checkpoint after every generation.

    Also: checkpoints are written atomically, ``--trainer.strategy ddp`` runs without the gradient wrapper,
    ``fit --ckpt_path last`` continues the newest run's folder, data and checkpoint are checked before anything
    is written to disk, every run folder gets ``quant_map.txt`` and, after a fit, ``report.png`` or, after a test,
    ``test_results.json``, ``test`` ends with a table that compares with the FP and baseline tests of the same
    family (evolq_pl.results), and the progress bar follows the whole search (evolq_pl.progress).
    """

    def add_arguments_to_parser(self, parser) -> None:
        # an epoch is one block visit: as many training steps (generations) as the model's num_cycles (linked once the
        # model exists, so that a bad num_cycles is reported by the model, not as a data module error)
        parser.link_arguments("model.engine", "data.init_args.generations_per_epoch", apply_on="instantiate",
                              compute_fn=lambda engine: engine.config.num_cycles)
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
        lightning = {name: skip for name, skip in LightningCLI.subcommands().items()
                     if name in ("fit", "validate", "test")}
        return {**lightning, **{name: {"model", "datamodule"} for name in EvolQTrainer.VERBS}}

    # -- the checkpoint: readable, and never silently overriding the given config ------------------------------

    def parse_arguments(self, parser, args) -> None:
        """Keep the model config as given, and read a --ckpt_path file now with a one-line error if it is broken.

        LightningCLI next loads the file itself (an unreadable one fails there with a bare OSError) and replaces the
        model config with the checkpoint's hyperparameters, so ``--model.w_bits 4`` with a W3 checkpoint would
        quietly run W3; :meth:`before_instantiate_classes` puts the given config back and the checkpoint is then
        checked against it, as for ``--ckpt_path last``.
        """
        super().parse_arguments(parser, args)
        self._given_model = self._checkpoint = None
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._given_model = copy.deepcopy(self.config[subcommand].model)
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path and Path(ckpt_path).is_file():
                self._checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        if self._given_model is not None:
            self.config[self.subcommand].model = self._given_model
        if self.subcommand == "fit" and self.config.fit.ckpt_path == "last":
            self._continue_newest_run(self.config.fit)

    @staticmethod
    def _continue_newest_run(config: Any) -> None:
        """Pin the logger's version to the folder of the newest last.ckpt.

        Lightning looks for ``last`` under the logger's *next* version, which is always empty, warns and starts the
        search from scratch; pinning the version also keeps the resumed run's logs and checkpoints in its folder.
        """
        init = getattr(config.trainer.logger, "init_args", None)
        if config.checkpoint.dirpath is not None or init is None or getattr(init, "version", 0) is not None:
            return  # Lightning finds last.ckpt in an explicit dirpath; an explicit version is the user's choice
        if getattr(init, "save_dir", None) is None:
            return
        root = Path(init.save_dir) / (init.name or "")
        last = newest_last_checkpoint(sorted(root.glob("*/checkpoints")))
        if last is not None:
            init.version = last.parent.parent.name

    # -- trainer: atomic checkpoint files, DDP without DistributedDataParallel ---------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        init = self.config_init  # the subcommand's own config where there is one, as LightningCLI reads it
        config = init.get(str(self.subcommand), init).get("trainer", {})
        if isinstance(self.model, EvolQModule) and config.get("max_epochs") is None:
            kwargs.setdefault("max_epochs", self.model.engine.num_visits)  # one epoch per block visit
        if getattr(self.datamodule, "heldout_size", None) == 0 and config.get("limit_val_batches") is None:
            kwargs.setdefault("limit_val_batches", 0)  # no held-out split: no validation loop to build
        callbacks = kwargs.get("callbacks", config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        callbacks += [cb() for cb in (QuantMapFile, RunReport, TestResultsFile)
                      if not any(isinstance(c, cb) for c in callbacks)]
        progress_bar = kwargs.get("enable_progress_bar", config.get("enable_progress_bar"))
        if progress_bar is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(SearchProgressBar())
        kwargs["callbacks"] = callbacks
        kwargs["strategy"] = search_strategy_for(kwargs.get("strategy", config.get("strategy", "auto")))
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, CheckpointAfterHeldout) for c in trainer.callbacks):
            trainer.callbacks.append(CheckpointAfterHeldout())  # after the ModelCheckpoint: see its docstring
        return trainer

    # -- refuse bad input before the logger, the config file or a checkpoint is written ------------------------

    def before_fit(self) -> None:
        self._preflight("fit")

    def before_validate(self) -> None:
        self._preflight("validate")

    def before_test(self) -> None:
        self._preflight("test")

    def after_test(self) -> None:
        """End ``test`` with the results table (this test, and the FP and baseline tests of the same family)."""
        path = Path(self.trainer.log_dir or "") / RESULTS_FILE
        if (self.trainer.logger is not None and self.trainer.is_global_zero and path.is_file()
                and "top1" in json.loads(path.read_text())):
            print("\n" + results_table(path.parent))

    def _preflight(self, stage: str) -> None:
        """Read the data splits and the checkpoint now; Lightning would only fail after creating the run folder."""
        if self.datamodule is not None:
            self.datamodule.setup(stage)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path == "last":
            folders = [Path(cb.dirpath) if cb.dirpath else Path(self.trainer.log_dir or ".") / "checkpoints"
                       for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
            ckpt_path = newest_last_checkpoint(folders)
        if ckpt_path is None or not isinstance(self.model, EvolQModule):
            return
        checkpoint = self._checkpoint if self._checkpoint is not None else AtomicCheckpointIO().load_checkpoint(ckpt_path)
        self._checkpoint = None
        data_hparams = dict(self.datamodule.hparams) if self.datamodule is not None else None
        self.model.check_checkpoint(checkpoint, resume=stage == "fit", data_hparams=data_hparams)


def cli_main(args: Sequence[str] | None = None) -> EvolQCLI:
    """Run one CLI command (``args`` as on the command line; default ``sys.argv[1:]``)."""
    if args is None:  # the program's own command line: resolved where it is, so Lightning reads it as usual
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        args = resolve_config_args(args)
    try:
        with quiet_lightning():
            return EvolQCLI(
                EvolQModule,
                CalibrationDataModule,
                trainer_class=EvolQTrainer,
                subclass_mode_data=True,
                seed_everything_default=0,
                auto_configure_optimizers=False,
                save_config_kwargs={"overwrite": True},
                args=args,
            )
    finally:
        # a DDP rank that exits with its process group alive may abort in gloo's thread teardown ("terminate called
        # without an active exception"), and the launcher then kills the other ranks: close it on the way out
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli_main()
