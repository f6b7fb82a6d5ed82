"""One door from a timm model name to a quantized model: weights, family lookup, validation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from evolq_pl.models.base import QuantizedModel
from evolq_pl.quant.config import QuantConfig

Builder = Callable[[nn.Module, QuantConfig, str], QuantizedModel]
FAMILIES: dict[type, tuple[str, Builder]] = {}

# The paper's models with the timm tags that hold the same weights as the original code (evolq-reference §6).
PAPER_MODELS = {
    "vit_base": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
    "levit_128s": "levit_128s.fb_dist_in1k",
    "levit_128": "levit_128.fb_dist_in1k",
    "levit_192": "levit_192.fb_dist_in1k",
    "levit_256": "levit_256.fb_dist_in1k",
    "levit_384": "levit_384.fb_dist_in1k",
    "swin_tiny": "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_small": "swin_small_patch4_window7_224.ms_in1k",
    "swin_base": "swin_base_patch4_window7_224.ms_in1k",
}


def register_family(timm_class: type, label: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(timm_model, qconfig, name)`` quantizes instances of ``timm_class``."""

    def wrap(builder: Builder) -> Builder:
        FAMILIES[timm_class] = (label, builder)
        return builder

    return wrap


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata from a .pth/.pt/.bin/.safetensors file, with one-line errors."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path '{path}' does not exist: give the path of a timm weight file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), {}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise ValueError(f"cannot read weights from '{path}' (corrupt or not a PyTorch file): {err}") from None
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' holds no state dict of tensors: give a timm weight file")
    return obj, meta


def _cached_weight_file(model_name: str) -> str | None:
    """Path of the model's weights in the local Hugging Face cache, without touching the network."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.file and os.path.isfile(cfg.file):
        return cfg.file
    if not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if filename:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                return hit
    return None


def create_fp_model(
    model_name: str,
    pretrained: bool = True,
    checkpoint_path: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The float timm model with its weights, in eval mode; never downloads."""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model '{model_name}': not a timm model name (list them with timm.list_models())")
    kwargs = dict(model_kwargs or {})
    state = None
    if checkpoint_path:
        state, meta = _read_checkpoint(Path(checkpoint_path))
        kwargs = {**meta.get("model_kwargs", {}), **kwargs}
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise ValueError(
                f"weights in '{checkpoint_path}' do not fit {model_name} {kwargs or ''}: {first} "
                "(check model_name and model_kwargs)"
            ) from None
    elif pretrained:
        file = _cached_weight_file(model_name)
        if file is None:
            raise FileNotFoundError(
                f"no local weights for '{model_name}': not in the Hugging Face cache and no checkpoint_path; "
                f"on a machine with internet run python -c \"import timm; timm.create_model('{model_name}', "
                "pretrained=True)\" and copy its cache (HF_HOME), or pass --model.checkpoint_path FILE"
            )
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": file}, **kwargs)
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"weights of '{model_name}' hold NaN or inf in '{name}': the weight file is corrupt")
    return model.eval()


def family_of(model: nn.Module) -> tuple[str, Builder]:
    for cls in type(model).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    supported = ", ".join(label for label, _ in FAMILIES.values())
    raise ValueError(f"model class {type(model).__name__} is not supported: quantized families are {supported}")


def quantize_model(model: nn.Module, qconfig: QuantConfig, model_name: str) -> QuantizedModel:
    """Wrap a float timm model with the quantizers of its family (parameters are shared, not copied)."""
    _, builder = family_of(model)
    return builder(model, qconfig, model_name)


def create_quantized_model(
    model_name: str,
    qconfig: QuantConfig | None = None,
    pretrained: bool = True,
    checkpoint_path: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> QuantizedModel:
    """timm name (+ weights) -> uncalibrated quantized model."""
    fp = create_fp_model(model_name, pretrained, checkpoint_path, model_kwargs)
    family_of(fp)
    return quantize_model(fp, qconfig or QuantConfig(), model_name)


def weights_fingerprint(model: nn.Module) -> float:
    """A cheap number that changes when the FP weights change; stored in search checkpoints."""
    total = 0.0
    for p in model.parameters():
        total += float(p.detach().double().abs().sum()) * (1 + math.log1p(p.numel()))
    return total
