"""Evaluation preprocessing per model, as Evol-Q uses it.

timm's pretrained config is the source of truth, except where Evol-Q's own transform differs: it resizes DeiT and
LeViT inputs with crop_pct 0.875 (256 -> 224), while timm says 0.9. Matching the original's numbers needs its crop.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import get_pretrained_cfg

# Family (model-name prefix before the first underscore, as in Evol-Q) -> fields that differ from timm's cfg.
EVOLQ_OVERRIDES: dict[str, dict[str, Any]] = {
    "deit": {"crop_pct": 0.875},
    "levit": {"crop_pct": 0.875},
}


def preprocessing_for(model_name: str) -> dict[str, Any]:
    """Return input_size (C, H, W), interpolation, crop_pct, mean and std for a timm model name.

    The name may carry a pretrained tag (``deit_tiny_patch16_224.fb_in1k``); pin the tag where timm's default
    weights differ from the paper's (e.g. ViT-B: ``.augreg_in21k_ft_in1k``). No model is built.
    """
    arch = model_name.split(".", 1)[0]
    hint = "list the known names with timm.list_models('pattern*', pretrained=True)"
    if not timm.is_model(arch):
        raise ValueError(f"model name {model_name!r} is unknown to timm {timm.__version__}; {hint}")
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError as err:  # timm raises RuntimeError for a tag the architecture does not have
        raise ValueError(
            f"pretrained tag in {model_name!r} is unknown to timm {timm.__version__}; {hint}"
        ) from err
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for {model_name!r}; {hint}")
    pre: dict[str, Any] = {
        "input_size": tuple(cfg.input_size),
        "interpolation": cfg.interpolation,
        "crop_pct": float(cfg.crop_pct),
        "mean": tuple(float(m) for m in cfg.mean),
        "std": tuple(float(s) for s in cfg.std),
    }
    pre.update(EVOLQ_OVERRIDES.get(arch.split("_", 1)[0], {}))
    return pre
