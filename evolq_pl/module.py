"""EvolQModule: Lightning's side of the Evol-Q search, which itself lives in :class:`~evolq_pl.search.SearchEngine`.

One epoch is one block visit and one training step one generation (cli.py sets ``max_epochs`` and the data module's
``generations_per_epoch``). The module calibrates, builds the FP teacher's logits, hands each step to the engine,
and keeps the quantizer buffers and the engine's state in checkpoints. Logs, held-out selection and run files are
callbacks (evolq_pl.callbacks).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from evolq_pl import run_checks
from evolq_pl.callbacks import FusedKernels, HeldoutSelection, SearchLogger
from evolq_pl.data import calibration_batches
from evolq_pl.evaluation import ClassifierEvaluation
from evolq_pl.fitness import get_fitness
from evolq_pl.models import create_quantized_model
from evolq_pl.models.registry import weights_fingerprint
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, quantization_disabled, quantizers, set_quantized
from evolq_pl.run_checks import CKPT_KEY, CKPT_VERSION, check_run, teacher_id
from evolq_pl.search.engine import NonFiniteBaseline, SearchEngine
from evolq_pl.search.evaluator import SuffixEvaluator
from evolq_pl.search.scales import ScaleVector
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.strategy import check_search_strategy


class GenerationCounter(torch.optim.Optimizer):
    """The search's optimizer, which changes nothing: Lightning counts optimizer steps as ``global_step`` (what
    ``every_n_train_steps`` checkpoints and step logs go by) and offers no other public way to count a step."""

    def __init__(self, device: torch.device) -> None:
        super().__init__([torch.zeros(1, device=device)], {})  # an optimizer needs a tensor; this one never changes

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None


class EvolQModule(ClassifierEvaluation):
    """Evol-Q post-training quantization of a timm vision transformer.

    Args:
        model_name: timm model name with its tag, e.g. ``deit_tiny_patch16_224.fb_in1k``.
        pretrained: load timm's weights from the local cache (never downloads).
        checkpoint_path: a weight file to load instead (.pth/.safetensors; a ``meta.model_kwargs`` entry is used).
        model_kwargs: keyword arguments for ``timm.create_model`` (other sizes, class count, image size).
        w_bits: weight bits (2..8; the paper uses 3, 4, 8).
        a_bits: activation bits (2..8; the paper uses 8).
        preset: quantization recipe, ``e2e`` (the reference's run script) or ``fq_vit``.
        quant_overrides: any other ``QuantConfig`` field, e.g. ``{softmax: lis, fit_on: all}``.
        strategy: the search algorithm (evolq_pl.search.strategies): ``evolq``, the paper's steady-state evolution
            (the default); ``cmaes`` (CMA-ES from the cma package); ``multifidelity`` (many mutations screened on a
            few calibration batches, the best re-scored on all).
        strategy_options: the chosen strategy's own settings (its ``options``), e.g. ``{popsize: 5, sigma: 0.03}``.
        population_size: individuals per block visit (all start as the current scales).
        tournament_size: individuals drawn with replacement to pick a parent.
        num_cycles: generations (one child each) per block visit.
        num_passes: passes over all blocks.
        eps: mutation half-width; None picks 1e-3 for 3/4-bit and 1e-4 for 8-bit weights.
        relative_mutation: scale the noise by each scale's magnitude instead of the reference's absolute noise.
        search_mlp: also search the MLP Linear scales of each block.
        fitness: ``infonce`` (the reference), ``mse``, ``kl`` or ``cosine``.
        temperature: infoNCE temperature T (the loss is multiplied by 2T).
        teacher: ``fp`` (the unquantized model) or ``int_ln`` (the original's teacher: integer LayerNorm left on).
        selection: ``none`` (the clean default) or ``heldout``: keep the scales with the best held-out top-1,
            the original's per-block selection pointed at a split of train, never at the test set.
        seed: seeds the search's random generator (selection and mutation).
        eval_fp: validate/test the FP model instead of the quantized one.
        fused: run fake-quantization and integer LayerNorm as compiled one-pass kernels (``torch.compile``); the
            same bits as without, faster on large activations, a compile on first use (evolq_pl.quant.fused).
    """

    def __init__(
        self,
        model_name: str = "deit_tiny_patch16_224.fb_in1k",
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        w_bits: int = 4,
        a_bits: int = 8,
        preset: Literal["e2e", "fq_vit"] = "e2e",
        quant_overrides: dict[str, Any] | None = None,
        strategy: str = "evolq",
        strategy_options: dict[str, Any] | None = None,
        population_size: int = 15,
        tournament_size: int = 10,
        num_cycles: int = 3,
        num_passes: int = 10,
        eps: float | None = None,
        relative_mutation: bool = False,
        search_mlp: bool = False,
        fitness: Literal["infonce", "mse", "kl", "cosine"] = "infonce",
        temperature: float = 3.0,
        teacher: Literal["fp", "int_ln"] = "fp",
        selection: Literal["none", "heldout"] = "none",
        seed: int = 0,
        eval_fp: bool = False,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        for name, value, choices in (("teacher", teacher, ("fp", "int_ln")),
                                     ("selection", selection, ("none", "heldout"))):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: choose {' or '.join(choices)}")
        self.qconfig = QuantConfig.from_preset(preset, w_bits=w_bits, a_bits=a_bits, **(quant_overrides or {}))
        search = SearchConfig(population_size, tournament_size, num_cycles, num_passes, eps, relative_mutation,
                              dict(strategy_options or {}))
        self.fitness_fn = get_fitness(fitness, temperature)
        self.qmodel = create_quantized_model(model_name, self.qconfig, pretrained, checkpoint_path, model_kwargs)
        self.qmodel.requires_grad_(False)
        self.blocks = self.qmodel.search_blocks(include_mlp=search_mlp)
        self.engine = SearchEngine(len(self.blocks), [search.resolve_eps(b.bits) for b in self.blocks], search,
                                   strategy, seed)
        self.init_metrics(self.qmodel.num_classes)
        self.strict_loading = False  # checkpoints hold quantizer state only; on_load_checkpoint checks them
        self._weights_id = weights_fingerprint(self.qmodel)
        self._calib: list[torch.Tensor] = []
        self.teacher_id: str | None = None
        self._resumed_teacher_id: str | None = None
        self._selected: dict[str, Any] | None = None  # a tested checkpoint's search state, its selection put in on start

    @property
    def current_fitness(self) -> float | None:
        return self.engine.state.current_fitness

    @property
    def baseline_fitness(self) -> float | None:
        return self.engine.state.baseline_fitness

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed or tested with this module."""
        return {"model_name": self.hparams.model_name, "qconfig": repr(self.qconfig),
                "num_blocks": len(self.blocks), "search_mlp": self.hparams.search_mlp}

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks the module's options need, where the Trainer has none of their kind (from an earlier run)."""
        return [cb() for cb in (FusedKernels, SearchLogger, HeldoutSelection)
                if not any(isinstance(c, cb) for c in self.trainer.callbacks)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return GenerationCounter(self.device)

    # -- calibration and teacher -----------------------------------------------------------------------------------

    def _calibration(self) -> list[torch.Tensor]:
        if not self._calib:
            self._calib = calibration_batches(getattr(self.trainer, "datamodule", None))
            self.qmodel.check_input(self._calib[0])
        return self._calib

    def ensure_calibrated(self) -> None:
        """Calibrate unless a checkpoint already brought calibrated quantizers; either way switch them on."""
        if self._selected is not None:  # the checkpoint's weights are loaded by now: put the kept scales in
            self.apply_heldout_selection(self._selected)
            self._selected = None
        if all(bool(q.calibrated) for _, q in quantizers(self.qmodel)):
            set_quantized(self.qmodel, True)
            self.qmodel.train(self.qmodel.training)  # one mode for every submodule, as calibrate() leaves it
            return
        started = time.perf_counter()
        calibrate(self.qmodel, self._calibration(), fit_on=self.qconfig.fit_on, device=self.device)
        rank_zero_info(f"calibrated {self.hparams.model_name} on {sum(len(b) for b in self._calib)} images "
                       f"in {time.perf_counter() - started:.1f} s")

    # -- fit: the engine does the search ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_search_strategy(self.trainer.strategy)
            run_checks.check_search_trainer(self.trainer, self.engine.num_visits)
            run_checks.check_heldout_selection(self.hparams.selection, getattr(self.trainer, "datamodule", None))

    @torch.no_grad()
    def on_fit_start(self) -> None:
        self.ensure_calibrated()
        rank, world = self.global_rank, self.trainer.world_size
        run_checks.check_calibration_shards(len(self._calibration()), world)
        shard = [b.to(self.device) for b in self._calibration()[rank::world]]  # this rank's batches, round robin
        with quantization_disabled(self.qmodel, keep_int_norm=self.hparams.teacher == "int_ln"):
            teachers = [self.qmodel(x).float() for x in shard]
        reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
        self.teacher_id = teacher_id(teachers, sum(len(b) for b in self._calib), reduce, self.device)
        if self._resumed_teacher_id not in (None, self.teacher_id):
            raise ValueError("checkpoint was searched with another calibration set or teacher "
                             f"({self._resumed_teacher_id} vs {self.teacher_id}): resume with the same data and seed")
        # Stacking a generation's candidates along the batch measured no faster on a CPU (one thread, DeiT-Tiny:
        # benchmarks/results/batched_speed_cpu_deit_tiny.json), so a CPU scores them one after another.
        self.engine.evaluator = SuffixEvaluator(self.qmodel, self.blocks, shard, teachers, self.fitness_fn,
                                                self.device, None if world == 1 else reduce,
                                                stack=1 if self.device.type == "cpu" else 8)

    def on_train_start(self) -> None:
        run_checks.check_generations_per_epoch(self.trainer.num_training_batches, self.engine.config.num_cycles)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        if self.engine.next_visit > self.current_epoch:
            return None  # a resumed epoch replays the ticks of a visit its checkpoint had already finished
        try:
            report = self.engine.step()
        except NonFiniteBaseline as err:
            raise RuntimeError(
                f"the calibrated model's fitness on the calibration set is {err.fitness}, so no candidate can be "
                "compared with it: look for NaN/inf in the calibration images or weights so large that the logits "
                "overflow, and with fused: true try fused: false") from None
        self.optimizers().step()  # one global_step per generation
        return {"generation": report}

    # -- checkpoints: quantizer buffers + the engine's state, checked on load ------------------------------------------

    def _quantizer_keys(self) -> set[str]:
        return {f"qmodel.{name}.{key}" for name, q in quantizers(self.qmodel) for key, _ in q.named_buffers()
                if "observer" not in key}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self._quantizer_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint[CKPT_KEY] = {"version": CKPT_VERSION, "identity": self.identity(), "weights_id": self._weights_id,
                                "teacher_id": self.teacher_id, "search": self.engine.state_dict()}

    def check_checkpoint(self, checkpoint: dict[str, Any], resume: bool = False,
                         data_hparams: dict[str, Any] | None = None) -> dict[str, Any]:
        """Refuse a checkpoint of another run (or, to resume, of other settings); returns its search entry."""
        return check_run(checkpoint, self.identity(), self._weights_id, self._quantizer_keys(), self.hparams, resume,
                         data_hparams)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        try:
            fitting = self.trainer.state.fn == "fit"
        except RuntimeError:  # not attached to a Trainer (LightningModule.load_from_checkpoint)
            fitting = False
        dm = getattr(self.trainer, "datamodule", None) if fitting else None
        state = self.check_checkpoint(checkpoint, resume=fitting,
                                      data_hparams=dict(dm.hparams) if dm is not None else None)
        if fitting:
            self.engine.load_state_dict(state["search"])
            self._resumed_teacher_id = state["teacher_id"]
        else:
            self._selected = state

    def apply_heldout_selection(self, state: dict[str, Any]) -> None:
        """A held-out-selection checkpoint holds the last visit's scales, while its fit ended with the best held-out
        ones (HeldoutSelection): put those in, for every use of the checkpoint (test, validate, export, landscape)."""
        snapshot = state["search"].get("best_snapshot")
        if self.hparams.selection == "heldout" and snapshot is not None:
            for block, scales in zip(self.blocks, snapshot, strict=True):
                ScaleVector(block.layers).set(scales)
