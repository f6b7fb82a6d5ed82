"""EvolQModule: Lightning's side of the Evol-Q search, which itself lives in :class:`~evolq_pl.search.SearchEngine`.

One epoch is one block visit and one training step one generation (cli.py sets ``max_epochs`` and the data module's
``generations_per_epoch``). The module calibrates, builds the FP teacher's logits, hands each step to the engine,
and keeps the quantizer buffers and the engine's state in checkpoints. Those three parts are mixins, each in its own
file: calibration and teacher (evolq_pl.calibration), checkpoints (evolq_pl.checkpointing), held-out validation and
test (evolq_pl.evaluation). Logs, held-out selection and run files are callbacks (evolq_pl.callbacks).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback

from evolq_pl import run_checks
from evolq_pl.calibration import CalibratedTeacher
from evolq_pl.callbacks import FusedKernels, HeldoutSelection, SearchLogger
from evolq_pl.checkpointing import GenerationCounter, SearchCheckpointing
from evolq_pl.evaluation import ClassifierEvaluation
from evolq_pl.fitness import get_fitness
from evolq_pl.models import create_quantized_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.search.engine import NonFiniteBaseline, SearchEngine
from evolq_pl.search.schedule import SearchConfig
from evolq_pl.strategy import check_search_strategy


class EvolQModule(ClassifierEvaluation, SearchCheckpointing, CalibratedTeacher):
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
        search_head: also search the classifier head's weight scales, as one more unit (visited first in a pass).
        search_stem: also search the stem's (patch embedding's) weight scales, as one more unit rerun from the
            images (visited first in a pass, before the head).
        search_jointly: search the blocks' (and the head's) scales as one unit, so that every visit moves all of
            them (with ``strategy: gradient``, one gradient through the whole model per generation); a searched
            stem stays a unit of its own.
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
        search_head: bool = False,
        search_stem: bool = False,
        search_jointly: bool = False,
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
        self.blocks = self.qmodel.search_blocks(search_mlp, search_head, search_stem, search_jointly)
        self.engine = SearchEngine(len(self.blocks), [search.resolve_eps(b.bits) for b in self.blocks], search,
                                   strategy, seed, names=[b.name for b in self.blocks])
        self.init_metrics(self.qmodel.num_classes)
        self.init_checkpointing()
        self.init_calibration()

    @property
    def current_fitness(self) -> float | None:
        return self.engine.state.current_fitness

    @property
    def baseline_fitness(self) -> float | None:
        return self.engine.state.baseline_fitness

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks the module's options need, where the Trainer has none of their kind (from an earlier run)."""
        return [cb() for cb in (FusedKernels, SearchLogger, HeldoutSelection)
                if not any(isinstance(c, cb) for c in self.trainer.callbacks)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return GenerationCounter(self.device)

    # -- fit: the engine does the search ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_search_strategy(self.trainer.strategy)
            run_checks.check_search_trainer(self.trainer, self.engine.num_visits)
            run_checks.check_heldout_selection(self.hparams.selection, getattr(self.trainer, "datamodule", None))

    @torch.no_grad()
    def on_fit_start(self) -> None:
        self.ensure_calibrated()
        evaluator = self.build_evaluator()
        self.check_resumed_teacher()  # the teacher id exists only now, once this run's teacher logits do
        self.engine.evaluator = evaluator

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
