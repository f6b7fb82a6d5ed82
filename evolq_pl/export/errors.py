"""The export's one error type, and its check for ONNX and ONNX Runtime (importable without either)."""

from __future__ import annotations

import importlib


class ExportError(ValueError):
    """A model, option, folder or missing dependency the export cannot handle; the message says what to change."""


def require_dependencies() -> None:
    """Fail with one line when ``onnx`` or ``onnxruntime`` cannot be imported: the export writes its graph with
    the first and runs it in the second to check it."""
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"the export needs {' and '.join(missing)}, which cannot be imported: pip install "
                          f"{' '.join(missing)} (requirements.txt pins the tested versions)")
