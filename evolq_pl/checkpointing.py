"""What a search checkpoint holds, and how it comes back: quantizer buffers plus the engine's state, checked on load.

A mixin of :class:`~evolq_pl.module.EvolQModule`, kept apart so that the module reads as the search's adapter. It
needs ``self.qmodel``, ``self.blocks``, ``self.engine``, ``self.hparams`` and ``self.teacher_id``. The FP weights
stay out of the file (they come from timm or the checkpoint path); run_checks.check_run says why a file is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from evolq_pl.models.registry import weights_fingerprint
from evolq_pl.quant.modes import quantizers
from evolq_pl.run_checks import CKPT_KEY, CKPT_VERSION, check_run
from evolq_pl.search.scales import ScaleVector


class GenerationCounter(torch.optim.Optimizer):
    """The search's optimizer, which changes nothing: Lightning counts optimizer steps as ``global_step`` (what
    ``every_n_train_steps`` checkpoints and step logs go by) and offers no other public way to count a step."""

    def __init__(self, device: torch.device) -> None:
        super().__init__([torch.zeros(1, device=device)], {})  # an optimizer needs a tensor; this one never changes

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None


class SearchCheckpointing(LightningModule):
    """Save the quantizer buffers and the search state; refuse another run's checkpoint; resume or test one."""

    def init_checkpointing(self) -> None:
        self.strict_loading = False  # checkpoints hold quantizer state only; on_load_checkpoint checks them
        self._weights_id = weights_fingerprint(self.qmodel)
        self._resumed_teacher_id: str | None = None
        self._selected: dict[str, Any] | None = None  # a tested checkpoint's search state, put in by take_selection

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed or tested with this module."""
        # checkpoints from before these options lack their keys, so they are named only when set
        units = {k: True for k in ("search_head", "search_stem", "search_jointly") if self.hparams[k]}
        return {"model_name": self.hparams.model_name, "qconfig": repr(self.qconfig),
                "num_blocks": len(self.blocks), "search_mlp": self.hparams.search_mlp, **units}

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

    def check_resumed_teacher(self) -> None:
        """A resumed search must see the calibration set and teacher its checkpoint was searched with."""
        if self._resumed_teacher_id not in (None, self.teacher_id):
            raise ValueError("checkpoint was searched with another calibration set or teacher "
                             f"({self._resumed_teacher_id} vs {self.teacher_id}): resume with the same data and seed")

    def take_selection(self) -> None:
        """Once a tested checkpoint's weights are loaded, put its kept scales in (once)."""
        if self._selected is not None:
            self.apply_heldout_selection(self._selected)
            self._selected = None

    def apply_heldout_selection(self, state: dict[str, Any]) -> None:
        """A held-out-selection checkpoint holds the last visit's scales, while its fit ended with the best held-out
        ones (HeldoutSelection): put those in, for every use of the checkpoint (test, validate, export, landscape)."""
        snapshot = state["search"].get("best_snapshot")
        if self.hparams.selection == "heldout" and snapshot is not None:
            for block, scales in zip(self.blocks, snapshot, strict=True):
                ScaleVector(block.layers).set(scales)
