"""Whole models exported and run in ONNX Runtime: a searched ViT and a searched LeViT agree with PyTorch's evaluation,
every quantization option exports, the exported weights are integers on their b-bit grids, the FP graph is the FP
model, and what cannot be exported is refused by name."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
import torch
from lightning.pytorch import Trainer
from onnx import TensorProto, numpy_helper
from torch import nn

from evolq_pl.data import DemoDataModule
from evolq_pl.export import ExportError, build_onnx
from evolq_pl.export.record import dequantize, load_record, weight_values
from evolq_pl.export.runtime import logits, session
from evolq_pl.export.writer import MODEL_FILE, REPORT_FILE, export_quantized
from evolq_pl.models.base import QuantizedModel
from evolq_pl.models.levit import QuantLevit
from evolq_pl.models.vit import QuantViT
from evolq_pl.module import EvolQModule
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.modes import calibrate, quantization_disabled
from evolq_pl.quant.quantizer import FakeQuantizer
from evolq_pl.testing import TINY_VIT_NAME, unit_gain_vit

LEVIT_KWARGS = {"img_size": 96, "in_chans": 1, "num_classes": 10, "embed_dim": (32, 48), "key_dim": 8,
                "num_heads": (2, 3), "depth": (1, 1)}


@torch.no_grad()
def tiny_levit(seed: int = 0) -> nn.Module:
    """A 2-stage LeViT whose BatchNorms and attention biases are not timm's identity init."""
    torch.manual_seed(seed)
    model = timm.create_model("levit_128s", pretrained=False, **LEVIT_KWARGS)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2)
        elif isinstance(m, nn.Linear | nn.Conv2d):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5)
        if hasattr(m, "attention_biases"):
            m.attention_biases.normal_(0, 1)
    return model.eval()


def search(module: EvolQModule, data: DemoDataModule) -> EvolQModule:
    """One short pass of the search (the export's input is a searched model)."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                      num_sanity_val_steps=0, limit_val_batches=0, max_epochs=module.engine.num_visits)
    trainer.fit(module, datamodule=data)
    assert module.current_fitness <= module.baseline_fitness
    return module


def search_args(**kwargs) -> dict:
    return {"pretrained": False, "num_passes": 1, "population_size": 4, "tournament_size": 3, "num_cycles": 2,
            "seed": 0, **kwargs}


@pytest.fixture(scope="module")
def searched_vit(tiny_vit_checkpoint) -> tuple[EvolQModule, DemoDataModule]:
    data = DemoDataModule(calib_size=200, heldout_size=0, batch_size=100, test_batch_size=500,
                          generations_per_epoch=search_args()["num_cycles"])
    module = EvolQModule(model_name=TINY_VIT_NAME, checkpoint_path=tiny_vit_checkpoint, **search_args(w_bits=3))
    return search(module, data), data


@pytest.fixture(scope="module")
def searched_levit(tmp_path_factory) -> tuple[EvolQModule, DemoDataModule]:
    path = tmp_path_factory.mktemp("levit") / "tiny_levit.pth"
    torch.save({"state_dict": tiny_levit().state_dict(), "meta": {"model_kwargs": LEVIT_KWARGS}}, path)
    data = DemoDataModule(calib_size=100, heldout_size=0, batch_size=50, test_batch_size=250, image_size=96,
                          generations_per_epoch=search_args()["num_cycles"])
    module = EvolQModule(model_name="levit_128s", checkpoint_path=str(path),
                         **search_args(w_bits=4, quant_overrides={"weight_signed": True}))
    return search(module, data), data


def agreement(model: QuantizedModel, folder, loader, optimize: bool) -> tuple[float, float, float]:
    """Top-1 of PyTorch and of ONNX Runtime on ``loader``, and their agreement (percent)."""
    sess = session(folder / MODEL_FILE, optimize=optimize)
    ref, out, labels = [], [], []
    for x, y in loader:
        with torch.no_grad():
            ref.append(model(x).numpy())
        out.append(logits(sess, x))
        labels.append(y.numpy())
    ref, out, labels = np.concatenate(ref), np.concatenate(out), np.concatenate(labels)
    pct = lambda a: 100 * float(a.mean())  # noqa: E731
    return pct(ref.argmax(1) == labels), pct(out.argmax(1) == labels), pct(out.argmax(1) == ref.argmax(1))


@pytest.mark.parametrize("fixture", ["searched_vit", "searched_levit"])
def test_searched_model_runs_in_onnx_runtime_and_agrees_with_the_pytorch_evaluation(fixture, request, tmp_path):
    module, data = request.getfixturevalue(fixture)
    sample = next(iter(data.calib_dataloader()))[0]
    report = export_quantized(module.qmodel, tmp_path / "export", sample, "searched in the test")
    assert json.loads((tmp_path / "export" / REPORT_FILE).read_text())["source"] == "searched in the test"
    data.setup("test")
    for optimize in (True, False):
        torch_top1, ort_top1, agree = agreement(module.qmodel, tmp_path / "export", data.test_dataloader(), optimize)
        assert abs(ort_top1 - torch_top1) <= 0.1, (optimize, torch_top1, ort_top1)
        assert agree >= 99.5, (optimize, agree)
    assert report["check_on_sample"]["optimized"]["top1_agreement"] >= 0.99


def test_exported_weights_are_integers_on_their_b_bit_grids_in_the_graph_and_the_record(searched_levit, tmp_path):
    module, data = searched_levit
    export_quantized(module.qmodel, tmp_path, next(iter(data.calib_dataloader()))[0])
    graph = {t.name: t for t in onnx.load(str(tmp_path / MODEL_FILE)).graph.initializer}
    header, tensors = load_record(tmp_path)
    layers = {name: m for name, m in module.qmodel.named_modules() if hasattr(m, "weight_quantizer")}
    assert {n for n, e in header["tensors"].items() if e["kind"] == "weight"} == set(layers)
    for name, layer in layers.items():
        stored = graph[f"{name}.weight.qvalues"]
        assert stored.data_type == TensorProto.INT4  # W4, weight_signed: int4 tensors, not float weights
        values = numpy_helper.to_array(stored).astype(np.int64)
        assert values.min() >= -8 and values.max() <= 7
        assert np.array_equal(values, weight_values(header, tensors, name))
        assert header["tensors"][name]["bits"] == 4 and header["tensors"][name]["signed"]
        with torch.no_grad():
            expected = layer.quantized_weight().numpy()
        np.testing.assert_allclose(dequantize(header, tensors, name), expected, rtol=0,
                                   atol=1e-6 * np.abs(expected).max())
    assert not [t for t in graph.values() if t.data_type == TensorProto.FLOAT and t.name.endswith(".weight")]


def calibrated(model: nn.Module, cfg: QuantConfig, name: str, images: torch.Tensor) -> QuantizedModel:
    qmodel = (QuantLevit if "levit" in name else QuantViT)(model, cfg, name).eval()
    calibrate(qmodel, [images[:8], images[8:]])
    return qmodel


OPTIONS = {
    "deit w4 e2e": {},
    "deit w2": {"w_bits": 2},
    "deit w5 (uint8 container)": {"w_bits": 5},
    "deit w8 signed": {"w_bits": 8, "weight_signed": True},
    "deit a6 (clipped uint8)": {"a_bits": 6},
    "deit log2 softmax": {"softmax": "log2"},
    "deit log-int-softmax": {"softmax": "lis"},
    "deit no ptf": {"ptf": False},
    "deit float layernorm": {"int_norm": False},
    "deit fq_vit preset": {"preset": "fq_vit"},
    "vit avg pool": {"model": "vit", "global_pool": "avg"},
    "levit faithful": {"model": "levit", "faithful": True},
    "levit w3 lis": {"model": "levit", "w_bits": 3, "softmax": "lis"},
}


@pytest.mark.parametrize("case", OPTIONS)
def test_every_quantization_option_exports_and_runs_close_to_pytorch(case):
    options = dict(OPTIONS[case])
    family = options.pop("model", "deit")
    pool = options.pop("global_pool", None)
    preset = options.pop("preset", "e2e")
    cfg = QuantConfig.from_preset(preset, **options)
    g = torch.Generator().manual_seed(1)
    if family == "levit":
        name, model, images = "levit_128s", tiny_levit(1), torch.randn(24, 1, 96, 96, generator=g)
    else:
        name = "deit_tiny_patch16_224" if family == "deit" else "vit_tiny_patch16_224"
        model = unit_gain_vit(name, depth=2, **({"global_pool": pool, "fc_norm": False} if pool else {}))
        images = torch.randn(24, 3, 32, 32, generator=g)
    qmodel = calibrated(model, cfg, name, images[:16])
    proto, emitter = build_onnx(qmodel, tuple(images.shape[1:]))
    onnx.checker.check_model(proto, full_check=True)
    with torch.no_grad():
        expected = qmodel(images[16:]).numpy()
    step = float(qmodel.q_logits.scale)
    for optimize in (False, True):
        out = logits(session(proto.SerializeToString(), optimize=optimize), images[16:])
        steps = np.abs(out - expected) / step
        assert np.median(steps) == 0 and steps.max() <= 8, (optimize, steps.max())
    assert "weight" in emitter.forms


def test_the_fp_graph_is_the_fp_model():
    for name, model, shape in (("deit_tiny_patch16_224", unit_gain_vit(), (3, 32, 32)),
                               ("levit_128s", tiny_levit(), (1, 96, 96))):
        images = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
        qmodel = calibrated(model, QuantConfig(), name, torch.randn(16, *shape))
        proto, _ = build_onnx(qmodel, shape, quantized=False)
        with torch.no_grad(), quantization_disabled(qmodel):
            expected = qmodel(images).numpy()
        out = logits(session(proto.SerializeToString()), images)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_an_activation_the_emitters_do_not_know_is_refused_by_name():
    qmodel = calibrated(unit_gain_vit(), QuantConfig(), "deit_tiny_patch16_224", torch.randn(16, 3, 32, 32))
    qmodel.blocks[1].act = nn.Mish()
    with pytest.raises(ExportError, match=r"^blocks\.1\.act: activation Mish cannot be exported") as refused:
        build_onnx(qmodel, (3, 32, 32))
    assert "\n" not in str(refused.value)


def test_a_quantizer_the_family_exporter_leaves_out_is_refused():
    qmodel = calibrated(unit_gain_vit(), QuantConfig(), "deit_tiny_patch16_224", torch.randn(16, 3, 32, 32))
    extra = FakeQuantizer(BitType(8, False))
    extra.calibrated.fill_(True)
    qmodel.q_extra = extra
    with pytest.raises(ExportError, match=r"leaves 1 quantizer\(s\) out of the graph \(first: q_extra\)"):
        build_onnx(qmodel, (3, 32, 32))


def test_a_family_without_an_exporter_is_refused():
    qmodel = calibrated(unit_gain_vit(), QuantConfig(), "deit_tiny_patch16_224", torch.randn(16, 3, 32, 32))
    qmodel.__class__ = type("Other", (QuantizedModel,), {"forward": QuantViT.forward})
    with pytest.raises(ExportError, match=r"model family Other has no ONNX exporter \(exportable: .*Levit"):
        build_onnx(qmodel, (3, 32, 32))
