"""CNNs (ResNet with BasicBlock and Bottleneck, MobileNetV2) export to a QDQ ONNX graph that ONNX Runtime runs with the
logits of PyTorch's quantized evaluation, and the FP graph is the FP model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from evolq_pl.export import build_onnx
from evolq_pl.export.runtime import logits, session
from evolq_pl.models import quantize_model
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, quantization_disabled
from evolq_pl.testing import tiny_cnn

CASES = {
    "resnet18 w4": ("resnet18", {}, 48, {}),
    "resnet50 w3": ("resnet50", {}, 48, {"w_bits": 3}),
    "mobilenetv2 w4": ("mobilenetv2_035", {}, 32, {}),
    "resnet18 w8 signed, no bias correction": ("resnet18", {}, 48, {"w_bits": 8, "weight_signed": True,
                                                                     "bias_correction": False}),
}


def _calibrated(case: str) -> tuple[torch.nn.Module, torch.Tensor]:
    name, kwargs, side, cfg = CASES[case]
    images = torch.randn(24, 3, side, side, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_model(tiny_cnn(name, **kwargs), QuantConfig(**cfg), name).eval()
    calibrate(qmodel, [images[:8], images[8:16]])
    return qmodel, images[16:]


@pytest.mark.parametrize("case", CASES)
def test_cnn_exports_and_onnx_runtime_agrees_with_the_pytorch_evaluation(case):
    qmodel, images = _calibrated(case)
    proto, emitter = build_onnx(qmodel, tuple(images.shape[1:]))
    onnx.checker.check_model(proto, full_check=True)
    weights = [t for t in proto.graph.initializer if t.name.endswith(".weight.qvalues")]
    assert len(weights) == sum(1 for _ in qmodel.modules() if hasattr(_, "weight_quantizer"))
    assert all(t.data_type != TensorProto.FLOAT for t in weights)  # integer weights, not float ones
    with torch.no_grad():
        expected = qmodel(images).numpy()
    step = float(qmodel.q_logits.scale)
    for optimize in (False, True):
        out = logits(session(proto.SerializeToString(), optimize=optimize), images)
        steps = np.abs(out - expected) / step
        assert np.median(steps) == 0 and steps.max() <= 8, (optimize, steps.max())
        assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.75
    assert "weight" in emitter.forms


@torch.no_grad()
def test_the_fp_cnn_graph_is_the_fp_model():
    qmodel, images = _calibrated("mobilenetv2 w4")
    proto, _ = build_onnx(qmodel, tuple(images.shape[1:]), quantized=False)
    with quantization_disabled(qmodel):
        expected = qmodel(images).numpy()
    out = logits(session(proto.SerializeToString()), images)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
