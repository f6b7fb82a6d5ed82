"""The export benchmarks: the speed rows record what the lead needs to read them; the accuracy benchmark's per-op
check and its disagreement margins measure what they say."""

import json

import numpy as np
import torch

from benchmarks.export_accuracy import compare, op_agreement
from benchmarks.export_speed import main as speed_main
from evolq_pl.models.vit import QuantViT
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate
from evolq_pl.testing import unit_gain_vit


def test_speed_rows_record_the_machine_the_runtime_and_the_integer_kernels(tmp_path, capsys):
    out = tmp_path / "speed.json"
    speed_main(["--models", "tiny", "--threads", "1", "--repeats", "2", "--batch", "2", "--batch-repeats", "2",
                "--warmup", "0", "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["cpu"] and row["onnxruntime"] and row["threads"] == 1 and row["cpu_capability"]
    for label in ("latency_batch1", "throughput_batch2"):
        assert row[label]["w8a8"]["runs"] == row[label]["fp32"]["runs"] == 2
        assert row[label]["fp32_over_w8a8"] > 0
    assert row["ort_graph"]["w8a8"]["integer_kernels"]  # 8-bit weights: ONNX Runtime fuses integer MatMuls
    assert row["ort_graph"]["fp32"]["integer_kernels"] == {}
    assert row["model_onnx_bytes"]["w8a8"] < row["model_onnx_bytes"]["fp32"]
    assert "| tiny | 1 |" in capsys.readouterr().out


def test_op_agreement_feeds_each_op_pytorchs_input():
    qmodel = QuantViT(unit_gain_vit(), QuantConfig(), "deit_tiny_patch16_224").eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate(qmodel, [images[:8], images[8:]])
    ops = op_agreement(qmodel, images[:8])
    assert set(ops) == {"activation Q/DQ", "PTF Q/DQ (per channel)", "integer LayerNorm", "Conv (bias correction: "
                        "exact)", "Linear (bias correction: exact)", "softmax (uniform) + its quantizer"}
    assert ops["integer LayerNorm"]["differing_share"] == 0
    assert ops["activation Q/DQ"]["differing_share"] < 1e-3 and ops["activation Q/DQ"].get("max_steps", 0) <= 1.001
    assert ops["Linear (bias correction: exact)"]["max_rel_diff"] < 1e-5


def test_disagreements_are_counted_with_pytorchs_own_top_two_gap():
    step = 0.5
    reference = np.array([[1.0, 0.5, 0.0], [2.0, 0.0, 0.5], [0.0, 3.0, 1.0]])
    out = np.array([[0.5, 1.0, 0.0], [2.0, 0.0, 0.5], [0.0, 3.0, 1.0]])  # the first image flips over a 1-step gap
    stats = compare(out, reference, np.array([0, 0, 1]), step)
    assert stats["disagreeing_images"] == 1 and stats["disagreeing_margin_steps_max"] == 1.0
    assert np.isclose(stats["agreement"], 200 / 3) and np.isclose(stats["delta_top1"], -100 / 3)
    assert stats["max_abs_logit_diff_steps"] == 1.0
