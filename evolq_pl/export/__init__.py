"""Integer export of a quantized model: a QDQ ONNX graph that ONNX Runtime runs, and a runtime-neutral record.

Importing this package checks that onnx and onnxruntime are installed (one-line error otherwise) and registers the
exporter of every family (ViT/DeiT, LeViT, Swin, CNNs).
"""

from evolq_pl.export.errors import ExportError, require_dependencies

require_dependencies()

from evolq_pl.export import cnn, levit, swin, vit  # noqa: E402, F401  (registers the family exporters)
from evolq_pl.export.registry import build_onnx, register_exporter  # noqa: E402

__all__ = ["ExportError", "build_onnx", "register_exporter"]
