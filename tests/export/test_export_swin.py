"""A quantized Swin exported and run in ONNX Runtime: shifted windows, masks, padding and patch merging give the
PyTorch model's logits, for each softmax and with and without integer LayerNorm; the FP graph is the FP model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from evolq_pl.export import build_onnx
from evolq_pl.export.runtime import logits, session
from evolq_pl.models.swin import QuantSwin
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, quantization_disabled
from tests.models.test_swin import NAME, tiny_swin

# 20 px: a 10x10 grid padded to windows of 4 and shifted, merged to 5x5 (padded, shifted), merged with padding to 3x3
SIZES = {"tiny": {}, "padded": {"img_size": 20, "depths": (2, 2, 1), "num_heads": (2, 2, 4)}}
CASES = {"e2e w4": ("tiny", {}), "padded w3": ("padded", {"w_bits": 3}), "log2 softmax": ("tiny", {"softmax": "log2"}),
         "log-int-softmax": ("padded", {"softmax": "lis"}), "float layernorm": ("tiny", {"int_norm": False})}


def _calibrated(size: str, **cfg) -> tuple[QuantSwin, torch.Tensor]:
    model = tiny_swin(1, **SIZES[size])
    side = model.patch_embed.img_size[0]
    images = torch.randn(24, 3, side, side, generator=torch.Generator().manual_seed(1))
    qmodel = QuantSwin(model, QuantConfig(**cfg), NAME).eval()
    calibrate(qmodel, [images[:8], images[8:16]])
    return qmodel, images[16:]


@pytest.mark.parametrize("case", CASES)
def test_quantized_swin_runs_in_onnx_runtime_close_to_pytorch(case):
    size, cfg = CASES[case]
    qmodel, images = _calibrated(size, **cfg)
    proto, emitter = build_onnx(qmodel, tuple(images.shape[1:]))
    onnx.checker.check_model(proto, full_check=True)
    with torch.no_grad():
        expected = qmodel(images).numpy()
    step = float(qmodel.q_logits.scale)
    for optimize in (False, True):
        steps = np.abs(logits(session(proto.SerializeToString(), optimize=optimize), images) - expected) / step
        assert np.median(steps) == 0 and steps.max() <= 8, (optimize, steps.max())
    assert "weight" in emitter.forms and ("int_layer_norm" in emitter.forms) == (case != "float layernorm")


@pytest.mark.parametrize("size", SIZES)
def test_the_fp_swin_graph_is_the_fp_model(size):
    qmodel, images = _calibrated(size)
    proto, _ = build_onnx(qmodel, tuple(images.shape[1:]), quantized=False)
    with torch.no_grad(), quantization_disabled(qmodel):
        expected = qmodel(images).numpy()
    out = logits(session(proto.SerializeToString()), images)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
