"""Quantized timm model families; importing this package registers each family."""

from evolq_pl.models import cnn, levit, swin, vit  # noqa: F401  (registers every family: see each module)
from evolq_pl.models.registry import PAPER_MODELS, create_fp_model, create_quantized_model, quantize_model

__all__ = ["PAPER_MODELS", "create_fp_model", "create_quantized_model", "quantize_model"]
