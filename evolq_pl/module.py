"""EvolQModule: the Evol-Q search as a LightningModule.

One Lightning epoch is one visit of one search block (blocks last to first, ``num_passes`` times); one training
step is one evolutionary generation. There is no optimizer: candidates are scored by a fitness against cached FP
teacher logits on the calibration set, and only the suffix of the model after the visited block is re-run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

from evolq_pl.fitness import FitnessAccumulator, FitnessFn, get_fitness, infonce
from evolq_pl.models import create_quantized_model
from evolq_pl.models.base import QuantizedModel
from evolq_pl.models.registry import weights_fingerprint
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.fused import use_fused
from evolq_pl.quant.modes import calibrate, quantization_disabled, quantizers, set_quantized
from evolq_pl.search.evolution import Population, generation
from evolq_pl.search.scales import ScaleVector
from evolq_pl.search.schedule import SearchConfig, block_schedule
from evolq_pl.strategy import SearchDDPStrategy

CKPT_KEY = "evolq"
CKPT_VERSION = 1
# hyperparameters a resumed search must share with its checkpoint (others, e.g. eval_fp, may change)
RESUME_KEYS = ("population_size", "tournament_size", "num_cycles", "num_passes", "eps", "relative_mutation",
               "fitness", "temperature", "teacher", "selection")
RESUME_DATA_KEYS = ("calib_size", "heldout_size", "batch_size", "seed", "image_size")


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


@torch.no_grad()
def suffix_fitness(qmodel: QuantizedModel, block: int, inputs: list[torch.Tensor], teachers: list[torch.Tensor],
                   fitness_fn: FitnessFn, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sum over batches of the fitness of the logits from block ``block``'s cached inputs, and the batch count.

    The sum stays a device tensor, so scoring a candidate costs one host sync (when the caller reads it), not one
    per batch; the speed benchmark calls this too, so it times exactly what the search runs.
    """
    acc = FitnessAccumulator(device)
    for hidden, teacher in zip(inputs, teachers, strict=True):
        acc.add(fitness_fn(qmodel.forward_from(block, hidden), teacher))
    return acc.total(), len(inputs)


class EvolQModule(LightningModule):
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
        if teacher not in ("fp", "int_ln"):
            raise ValueError(f"teacher={teacher!r}: choose fp or int_ln")
        if selection not in ("none", "heldout"):
            raise ValueError(f"selection={selection!r}: choose none or heldout")
        self.qconfig = QuantConfig.from_preset(preset, w_bits=w_bits, a_bits=a_bits, **(quant_overrides or {}))
        self.search_config = SearchConfig(population_size, tournament_size, num_cycles, num_passes, eps,
                                          relative_mutation)
        self.fitness_fn = get_fitness(fitness, temperature)
        self.qmodel = create_quantized_model(model_name, self.qconfig, pretrained, checkpoint_path, model_kwargs)
        self.qmodel.requires_grad_(False)
        self.blocks = self.qmodel.search_blocks(include_mlp=search_mlp)
        self.schedule = block_schedule(len(self.blocks), num_passes)
        self.eps = [self.search_config.resolve_eps(b.bits) for b in self.blocks]
        num_classes = self.qmodel.num_classes
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.strict_loading = False  # checkpoints hold quantizer state only; on_load_checkpoint checks them
        self._weights_id = weights_fingerprint(self.qmodel)
        self._reset_search_state()

    # -- search state (everything a resume needs besides the quantizer buffers) ---------------------------------

    def _reset_search_state(self) -> None:
        self.rng = np.random.default_rng(self.hparams.seed)
        self.visit = -1  # index into self.schedule of the visit in progress
        self.generation_in_visit = 0
        self.population: Population | None = None
        self.current_fitness: float | None = None  # fitness of the model as it stands
        self.baseline_fitness: float | None = None  # fitness of the calibrated model before any search
        self.visit_start_fitness: float | None = None
        self.visit_start_scales: torch.Tensor | None = None
        self.best_heldout: float = -math.inf
        self.best_snapshot: dict[str, torch.Tensor] | None = None
        self.baseline_snapshot: dict[str, torch.Tensor] | None = None  # calibrated scales before the search
        self.teacher_id: str | None = None
        self._pending_state: dict[str, Any] | None = None
        self._calib: list[torch.Tensor] = []
        self._teacher: list[torch.Tensor] = []
        self._block_inputs: list[torch.Tensor] = []
        self._prepared_visit: int | None = None

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed or tested with this module."""
        return {"model_name": self.hparams.model_name, "qconfig": repr(self.qconfig),
                "num_blocks": len(self.blocks), "search_mlp": self.hparams.search_mlp}

    # -- calibration data, teacher, calibration ------------------------------------------------------------------

    def _datamodule(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "calib_dataloader"):
            raise RuntimeError("EvolQModule needs a CalibrationDataModule (data: in the config) for its calibration set")
        return dm

    def _load_calibration(self) -> None:
        if self._calib:
            return
        dm = self._datamodule()
        batches = [_images(b) for b in dm.calib_dataloader()]
        if not batches:
            raise ValueError("the calibration loader yielded no batches: give calib_size >= 1")
        self._calib = batches
        self._calib_ids = list(dm.calib_ids()) if hasattr(dm, "calib_ids") else []

    def _shard(self) -> list[torch.Tensor]:
        """This rank's calibration batches (round robin), on the module's device."""
        rank, world = self.global_rank, self.trainer.world_size
        return [b.to(self.device) for b in self._calib[rank::world]]

    def _ensure_calibrated(self) -> None:
        """Calibrate unless a checkpoint already brought calibrated quantizers; either way switch them on."""
        if all(bool(q.calibrated) for _, q in quantizers(self.qmodel)):
            set_quantized(self.qmodel, True)
            return
        self._load_calibration()
        started = time.perf_counter()
        calibrate(self.qmodel, self._calib, fit_on=self.qconfig.fit_on, device=self.device)
        rank_zero_info(f"calibrated {self.hparams.model_name} on {sum(len(b) for b in self._calib)} images "
                       f"in {time.perf_counter() - started:.1f} s")

    @torch.no_grad()
    def _build_teacher(self) -> None:
        keep_int = self.hparams.teacher == "int_ln"
        shard = self._shard()
        with quantization_disabled(self.qmodel, keep_int_norm=keep_int):
            self._teacher = [self.qmodel(x).float() for x in shard]
        self._calib_shard = shard
        digest = sum(float(t.double().sum()) for t in self._teacher)
        digest = float(self.trainer.strategy.reduce(torch.tensor(digest, device=self.device), reduce_op="sum"))
        self.teacher_id = f"{len(self._calib_ids) or sum(len(b) for b in self._calib)}:{digest:.6e}"

    # -- fitness ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _fitness(self, block: int) -> float:
        """Mean fitness over all calibration batches (reduced across ranks) of the model as it stands."""
        total, count = suffix_fitness(self.qmodel, block, self._block_inputs, self._teacher, self.fitness_fn,
                                      self.device)
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = self.trainer.strategy.reduce(
                torch.tensor(float(count), dtype=torch.float64, device=self.device), reduce_op="sum")
            return FitnessAccumulator.mean_of(total, count)
        return float(total) / count  # one host sync per candidate, none per batch

    # -- Lightning hooks: fit --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        use_fused(self.hparams.fused)
        if stage == "fit":
            strategy = self.trainer.strategy
            if isinstance(strategy, DDPStrategy) and not isinstance(strategy, SearchDDPStrategy):
                raise ValueError("DDPStrategy wraps the model in DistributedDataParallel, which needs gradients the "
                                 "search does not have: pass strategy=evolq_pl.strategy.SearchDDPStrategy() "
                                 "(cli.py maps --trainer.strategy ddp to it)")
            self.trainer.fit_loop.max_epochs = len(self.schedule)
            dm = getattr(self.trainer, "datamodule", None)
            if dm is not None:
                dm.generations_per_epoch = self.search_config.num_cycles

    def on_fit_start(self) -> None:
        self._ensure_calibrated()
        self._load_calibration()
        self._build_teacher()
        pending = self._pending_state
        if pending is not None:
            if pending["teacher_id"] != self.teacher_id:
                raise ValueError(
                    "checkpoint was searched with another calibration set or teacher "
                    f"({pending['teacher_id']} vs {self.teacher_id}): resume with the same data and seed"
                )
            self._restore_search_state(pending)
            self._pending_state = None
        rank_zero_info(self.qmodel.format_quant_map())
        self._save_quant_map()

    def _block_of(self, visit: int) -> int:
        return self.schedule[visit]

    @torch.no_grad()
    def _start_visit(self, visit: int) -> None:
        block = self._block_of(visit)
        self._block_inputs = [self.qmodel.forward_to(block, x) for x in self._calib_shard]
        self._scales = ScaleVector(self.blocks[block].layers)
        self._prepared_visit = visit
        self._gen_clock = time.perf_counter()
        if self.population is not None and self.visit == visit:
            return  # resumed inside this visit: population, rng and counters came from the checkpoint
        vector = self._scales.get()
        if self.current_fitness is None:  # the only full evaluation of an unchanged model
            fitness = self._fitness(block)
            if not math.isfinite(fitness):  # every candidate would tie with it, and the scales drift unselected
                raise RuntimeError(
                    f"the calibrated model's fitness on the calibration set is {fitness}, so no candidate can be "
                    "compared with it: look for NaN/inf in the calibration images or weights so large that the "
                    "logits overflow, and with fused: true try fused: false")
            self.current_fitness = self.baseline_fitness = fitness
            self.baseline_snapshot = self._snapshot()
        self.visit, self.generation_in_visit = visit, 0
        self.visit_start_fitness, self.visit_start_scales = self.current_fitness, vector.clone()
        self.population = Population.from_initial(vector, self.current_fitness, self.search_config.population_size)

    def on_train_epoch_start(self) -> None:
        # Lightning runs only training_step under autocast: prepare the visit (its cached inputs and the baseline
        # fitness the children are compared with) in that same precision, as a visit prepared by a resume
        # inside training_step is (with bf16-mixed they were fp32 here and bf16 there)
        with self.trainer.precision_plugin.train_step_context():
            self._start_visit(self.current_epoch)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self._prepared_visit != self.current_epoch:  # Lightning skips on_train_epoch_start on a mid-epoch resume
            self._start_visit(self.current_epoch)
        if self.generation_in_visit >= self.search_config.num_cycles:
            return None  # a resumed epoch can offer more ticks than generations are left
        block = self._block_of(self.visit)
        rejected = 0

        def evaluate(candidate: torch.Tensor) -> float:
            nonlocal rejected
            self._scales.set(candidate)
            value = self._fitness(block)
            if not math.isfinite(value):
                rejected += 1
                rank_zero_warn(f"block {block}: a candidate's fitness is {value}; it is rejected")
            return value

        child, survived = generation(self.population, evaluate, self.eps[block], self.search_config.tournament_size,
                                     self.rng, self.search_config.relative_mutation)
        best = self.population.best()
        self._scales.set(best.scales)  # the model always holds the best individual so far
        self.current_fitness = best.fitness
        self.generation_in_visit += 1
        self._count_step()
        finite = [m.fitness for m in self.population if math.isfinite(m.fitness)]
        now = time.perf_counter()
        self.log_dict({
            "search/best_fitness": best.fitness,
            "search/mean_fitness": float(np.mean(finite)) if finite else math.inf,
            "search/child_fitness": child.fitness if math.isfinite(child.fitness) else -1.0,
            "search/accepted": float(survived and math.isfinite(child.fitness)),
            "search/rejected_nonfinite": float(rejected),
            "search/sec_per_generation": now - self._gen_clock,
        }, on_step=True, on_epoch=False, rank_zero_only=True)
        self._gen_clock = now
        self.log_dict({"block": float(block), "pass": float(self.visit // len(self.blocks)),
                       "gen": float(self.generation_in_visit)}, prog_bar=True, logger=False, on_step=True,
                      on_epoch=False, rank_zero_only=True)
        if self.generation_in_visit == self.search_config.num_cycles:
            self._end_visit(block)
        return None

    def _count_step(self) -> None:
        """Without an optimizer Lightning's global_step stays at 0; step-based checkpoints and logs need it."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _end_visit(self, block: int) -> None:
        best = self.population.best()
        change = ((best.scales - self.visit_start_scales).abs() / self.visit_start_scales.abs()).mean()
        self.log_dict({
            "visit/fitness_before": self.visit_start_fitness,
            "visit/fitness_after": best.fitness,
            "visit/rel_scale_change": float(change),
            "visit/block": float(block),
        }, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_epoch_end(self) -> None:
        self._block_inputs = []
        self._prepared_visit = None

    def teardown(self, stage: str) -> None:
        use_fused(False)  # process-wide switch: leave nothing behind for other models in this process

    def on_fit_end(self) -> None:
        if self.best_snapshot is not None:
            self._apply_snapshot(self.best_snapshot)
            rank_zero_info(f"restored the scales with the best held-out top-1 ({self.best_heldout:.2f})")

    # -- held-out validation (never the test set) ------------------------------------------------------------------

    def on_validation_start(self) -> None:
        self._ensure_calibrated()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        with quantization_disabled(self.qmodel):
            teacher = self.qmodel(x)
        logits = teacher if self.hparams.eval_fp else self.qmodel(x)
        self.val_top1.update(logits, y)
        self.log("heldout/infonce", infonce(logits, teacher, self.hparams.temperature), on_epoch=True,
                 sync_dist=True, batch_size=len(x))

    def on_validation_epoch_end(self) -> None:
        top1 = float(self.val_top1.compute()) * 100
        self.val_top1.reset()
        self.log("heldout/top1", top1, sync_dist=False)
        if self.hparams.selection == "heldout" and not self.trainer.sanity_checking and top1 > self.best_heldout:
            self.best_heldout = top1
            self.best_snapshot = self._snapshot()

    @contextmanager
    def calibrated_baseline(self) -> Iterator[EvolQModule]:
        """Temporarily put the calibrated (pre-search) scales back, e.g. to evaluate the baseline in-process."""
        if self.baseline_snapshot is None:
            raise RuntimeError("no baseline recorded: the search has not started")
        current = self._snapshot()
        self._apply_snapshot(self.baseline_snapshot)
        try:
            yield self
        finally:
            self._apply_snapshot(current)

    def _search_layers(self):
        return [layer for b in self.blocks for layer in b.layers]

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {str(i): layer.weight_quantizer.scale.detach().clone() for i, layer in enumerate(self._search_layers())}

    @torch.no_grad()
    def _apply_snapshot(self, snap: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self._search_layers()):
            layer.weight_quantizer.scale.copy_(snap[str(i)])

    # -- test: ImageNet val (or the data module's test split) -----------------------------------------------------

    def on_test_start(self) -> None:
        if not self.hparams.eval_fp:
            self._ensure_calibrated()
            rank_zero_info(self.qmodel.format_quant_map())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if self.hparams.eval_fp:
            with quantization_disabled(self.qmodel):
                logits = self.qmodel(x)
        else:
            logits = self.qmodel(x)
        self.test_top1.update(logits, y)
        self.test_top5.update(logits, y)

    def on_test_epoch_end(self) -> None:
        top1 = float(self.test_top1.compute()) * 100
        top5 = float(self.test_top5.compute()) * 100
        self.log_dict({"test/top1": top1, "test/top5": top5})
        self.test_top1.reset()
        self.test_top5.reset()
        if self.trainer.is_global_zero:
            self._write_results({
                "top1": top1, "top5": top5, "model": self.hparams.model_name, "w_bits": self.qconfig.w_bits,
                "a_bits": self.qconfig.a_bits, "preset": self.qconfig.preset, "seed": self.hparams.seed,
                "evaluated": "fp" if self.hparams.eval_fp else "quantized",
                "ckpt": str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None, "quant_config": repr(self.qconfig),
            })

    def _log_dir(self) -> Path | None:
        return Path(self.trainer.log_dir) if self.trainer.log_dir else None

    def _write_results(self, results: dict[str, Any]) -> None:
        log_dir = self._log_dir()
        if log_dir is None:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "test_results.json").write_text(json.dumps(results, indent=2) + "\n")
        rank_zero_info(f"test results written to {log_dir / 'test_results.json'}")

    def _save_quant_map(self) -> None:
        log_dir = self._log_dir()
        if log_dir is not None and self.trainer.logger is not None and self.trainer.is_global_zero:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "quant_map.txt").write_text(self.qmodel.format_quant_map() + "\n")

    # -- checkpoints: quantizer buffers + search state, checked on load ---------------------------------------------

    def _quantizer_keys(self) -> set[str]:
        return {f"qmodel.{name}.{key}" for name, q in quantizers(self.qmodel) for key, _ in q.named_buffers()
                if "observer" not in key}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self._quantizer_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint[CKPT_KEY] = {
            "version": CKPT_VERSION,
            "identity": self.identity(),
            "weights_id": self._weights_id,
            "teacher_id": self.teacher_id,
            "visit": self.visit,
            "generation_in_visit": self.generation_in_visit,
            "population": self.population.state_dict() if self.population is not None else None,
            "rng": self.rng.bit_generator.state,
            "current_fitness": self.current_fitness,
            "baseline_fitness": self.baseline_fitness,
            "visit_start_fitness": self.visit_start_fitness,
            "visit_start_scales": self.visit_start_scales,
            "best_heldout": self.best_heldout,
            "best_snapshot": self.best_snapshot,
            "baseline_snapshot": self.baseline_snapshot,
        }

    def check_checkpoint(self, checkpoint: dict[str, Any], resume: bool = False,
                         data_hparams: dict[str, Any] | None = None) -> dict[str, Any]:
        """Refuse a checkpoint of another run before any work is done; returns its search state.

        A resumed search must also keep the search and calibration settings, or it silently becomes a search that
        no uninterrupted run would give (the calibration data itself is checked through the teacher id later).
        """
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise ValueError("not an evolq-pl checkpoint (no search state): give a last.ckpt written by cli.py fit")
        if state["identity"] != self.identity():
            diff = {k: (state["identity"].get(k), v) for k, v in self.identity().items()
                    if state["identity"].get(k) != v}
            raise ValueError(f"checkpoint belongs to another run: {diff} (checkpoint vs config); "
                             "use the config the checkpoint was made with")
        if not math.isclose(state["weights_id"], self._weights_id, rel_tol=1e-9):
            raise ValueError("checkpoint was searched on other FP weights: load the same pretrained weights")
        missing = self._quantizer_keys() - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} quantizer entries (e.g. {sorted(missing)[0]}): "
                             "it is truncated or from another model")
        if resume:
            saved = checkpoint.get("hyper_parameters", {})
            diff = {k: (saved.get(k), self.hparams[k]) for k in RESUME_KEYS if saved.get(k) != self.hparams[k]}
            saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
            if data_hparams is not None and saved_data:
                diff.update({f"data.{k}": (saved_data.get(k), data_hparams.get(k)) for k in RESUME_DATA_KEYS
                             if saved_data.get(k) != data_hparams.get(k)})
            if diff:
                raise ValueError(f"cannot resume: the search settings changed {diff} (checkpoint vs config); "
                                 "resume with the config the checkpoint was made with")
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        dm = getattr(self.trainer, "datamodule", None) if fitting else None
        self._pending_state = self.check_checkpoint(checkpoint, resume=fitting,
                                                    data_hparams=dict(dm.hparams) if dm is not None else None)

    def _restore_search_state(self, state: dict[str, Any]) -> None:
        self.visit = state["visit"]
        self.generation_in_visit = state["generation_in_visit"]
        self.population = Population.from_state_dict(state["population"]) if state["population"] else None
        self.rng.bit_generator.state = state["rng"]
        self.current_fitness = state["current_fitness"]
        self.baseline_fitness = state["baseline_fitness"]
        self.visit_start_fitness = state["visit_start_fitness"]
        self.visit_start_scales = state["visit_start_scales"]
        self.best_heldout = state["best_heldout"]
        self.best_snapshot = state["best_snapshot"]
        self.baseline_snapshot = state.get("baseline_snapshot")

    def configure_optimizers(self) -> None:
        return None
