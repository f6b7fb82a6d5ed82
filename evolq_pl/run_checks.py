"""Is a checkpoint this run's? Identity, FP weights and quantizer entries always; the search settings for a resume.

A checkpoint of another model, bit width, preset or search is refused with a one-line error before any work is done;
the calibration data itself is checked later, through the teacher id, once the teacher's logits exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

CKPT_KEY, CKPT_VERSION = "evolq", 2
# hyperparameters a resumed search must share with its checkpoint (others, e.g. eval_fp, may change)
RESUME_KEYS = ("population_size", "tournament_size", "num_cycles", "num_passes", "eps", "relative_mutation",
               "fitness", "temperature", "teacher", "selection", "strategy", "strategy_options")
RESUME_DATA_KEYS = ("calib_size", "heldout_size", "batch_size", "seed", "image_size")


def check_run(checkpoint: dict[str, Any], identity: dict[str, Any], weights_id: float, quantizer_keys: set[str],
              hparams: Mapping[str, Any], resume: bool = False,
              data_hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's ``evolq`` entry, or a ValueError that says why the checkpoint is not this run's.

    A resumed search must also keep the search and calibration settings, or it silently becomes a search that no
    uninterrupted run would give.
    """
    state = checkpoint.get(CKPT_KEY)
    if state is None:
        raise ValueError("not an evolq-pl checkpoint (no search state): give a last.ckpt written by cli.py fit")
    if state["identity"] != identity:
        saved = state["identity"]
        diff = {k: (saved.get(k), identity.get(k)) for k in {**saved, **identity} if saved.get(k) != identity.get(k)}
        raise ValueError(f"checkpoint belongs to another run: {diff} (checkpoint vs config); "
                         "use the config the checkpoint was made with")
    if not math.isclose(state["weights_id"], weights_id, rel_tol=1e-9):
        raise ValueError("checkpoint was searched on other FP weights: load the same pretrained weights")
    missing = quantizer_keys - set(checkpoint["state_dict"])
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} quantizer entries (e.g. {sorted(missing)[0]}): "
                         "it is truncated or from another model")
    if not resume:
        return state
    if state.get("version") != CKPT_VERSION:
        raise ValueError(f"checkpoint holds a search state of version {state.get('version')} and this evolq-pl "
                         f"resumes version {CKPT_VERSION}: test the checkpoint, or start the search again")
    saved, saved_data = checkpoint.get("hyper_parameters", {}), checkpoint.get("datamodule_hyper_parameters") or {}
    diff = {k: (saved.get(k), hparams[k]) for k in RESUME_KEYS if saved.get(k) != hparams[k]}
    if data_hparams is not None and saved_data:
        diff.update({f"data.{k}": (saved_data.get(k), data_hparams.get(k)) for k in RESUME_DATA_KEYS
                     if saved_data.get(k) != data_hparams.get(k)})
    if diff:
        raise ValueError(f"cannot resume: the search settings changed {diff} (checkpoint vs config); "
                         "resume with the config the checkpoint was made with")
    return state


def teacher_id(teachers: list[torch.Tensor], num_images: int, reduce_sum: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device) -> str:
    """A fingerprint of the teacher's logits over all processes, which a resumed search must reproduce."""
    digest = sum(float(t.double().sum()) for t in teachers)
    return f"{num_images}:{float(reduce_sum(torch.tensor(digest, device=device))):.6e}"


def check_search_trainer(trainer: Any, num_visits: int) -> None:
    """Refuse a Trainer the search cannot run under: a gradient scaler, or not one epoch per block visit."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        raise ValueError("16-mixed precision scales gradients and the search has none, so its GradScaler refuses "
                         "every step: use bf16-mixed, or 16-mixed with a disabled scaler, plugins=[MixedPrecision("
                         "'16-mixed', 'cuda', torch.amp.GradScaler('cuda', enabled=False))]")
    max_epochs = trainer.max_epochs
    if not (max_epochs is not None and 0 < max_epochs <= num_visits):
        raise ValueError(f"max_epochs={max_epochs}, but the search has {num_visits} block visits (one per epoch): "
                         f"give the Trainer max_epochs={num_visits} or fewer (cli.py sets it)")


def check_heldout_selection(selection: str, datamodule: Any) -> None:
    """Held-out selection needs held-out images; without them it would silently select nothing."""
    if selection == "heldout" and getattr(datamodule, "heldout_size", None) == 0:
        raise ValueError("selection: heldout keeps the scales with the best held-out top-1, but the data module has "
                         "heldout_size=0: give data.heldout_size >= 1 (e.g. 1000) or use selection: none")


def check_generations_per_epoch(steps: int, num_cycles: int) -> None:
    """An epoch is one block visit: the training loader must give one step per generation."""
    if steps != num_cycles:
        raise ValueError(f"an epoch is one block visit of num_cycles={num_cycles} generations, but the training loader "
                         f"gives {steps} steps per epoch: give the data module generations_per_epoch={num_cycles} "
                         "(cli.py links them)")


def check_calibration_shards(num_batches: int, world_size: int) -> None:
    """Each DDP rank scores its own calibration batches; a rank without one would have nothing to score."""
    if num_batches < world_size:
        raise ValueError(f"{world_size} processes share {num_batches} calibration batches, so some would hold none: "
                         f"give at least {world_size} batches (data.calib_size / data.batch_size) or fewer devices")
