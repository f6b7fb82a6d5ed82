"""ONNX Runtime on CPU: sessions, batched logits, and the integer kernels its graph optimizer chose."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

# Operators of ONNX Runtime's optimized graphs that compute on integers (standard and com.microsoft contrib ops).
INTEGER_KERNELS = frozenset({
    "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
    "QLinearConv", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearConcat", "QLinearReduceMean",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul", "QLinearWhere",
})


def session(model: str | Path | bytes, threads: int = 1, optimize: bool = True,
            optimized_path: str | Path | None = None) -> ort.InferenceSession:
    """A CPU session. ``optimize``: ONNX Runtime's full graph optimization (its default, which fuses Q/DQ pairs
    into integer kernels where it can); False runs the graph as written, Q/DQ pairs in float."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the warning about saving an optimized, machine-specific graph is expected
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits of one batch of images."""
    x = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else images.astype(np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def optimized_ops(model: str | Path, threads: int = 1) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime runs after its optimizations (what it fused), not a timing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, threads, optimized_path=path)
        graph = onnx.load(str(path)).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))


def integer_kernels(ops: dict[str, int]) -> dict[str, int]:
    """The integer kernels among an optimized graph's operators."""
    return {op: n for op, n in ops.items() if op in INTEGER_KERNELS}
