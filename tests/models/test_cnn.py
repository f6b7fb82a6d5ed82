"""QuantCNN on tiny timm ResNets (BasicBlock, Bottleneck) and a MobileNetV2: BatchNorm folding, the map covering every
weight, block outputs as timm's, suffix evaluation, the search blocks of the issue's models, a Lightning search that
resumes bit for bit, and the one-line refusal of unsupported variants."""

from __future__ import annotations

import pytest
import timm
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from evolq_pl.data import DemoDataModule
from evolq_pl.models import create_quantized_model, quantize_model
from evolq_pl.models.cnn import QuantCNN
from evolq_pl.module import EvolQModule
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import calibrate, quantization_disabled
from evolq_pl.quant.quantizer import FakeQuantizer
from evolq_pl.testing import TINY_RESNET_KWARGS, tiny_cnn

SMALL = TINY_RESNET_KWARGS
# name -> (timm name, kwargs, image side, residual blocks)
MODELS = {
    "basic": ("resnet18", SMALL, 48, 4),
    "bottleneck": ("resnet50", SMALL, 48, 4),
    "mobilenetv2": ("mobilenetv2_035", {"num_classes": 10}, 32, 17),
}


def _timm(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    name, base, _, _ = MODELS[kind]
    return tiny_cnn(name, seed, **{**base, **kwargs})


def _images(kind: str, seed: int, n: int = 4, chans: int = 3) -> torch.Tensor:
    side = MODELS[kind][2]
    return torch.randn(n, chans, side, side, generator=torch.Generator().manual_seed(seed))


def _calibrated(kind: str, **cfg) -> tuple[nn.Module, QuantCNN]:
    model = _timm(kind)
    qmodel = quantize_model(model, QuantConfig(**cfg), MODELS[kind][0]).eval()
    calibrate(qmodel, [_images(kind, 10, 8), _images(kind, 11, 8)])
    return model, qmodel


@pytest.mark.parametrize("kind", list(MODELS))
@torch.no_grad()
def test_batchnorm_folding_and_quantization_off_reproduce_timm_logits(kind):
    model = _timm(kind)
    qmodel = quantize_model(model, QuantConfig(), MODELS[kind][0]).eval()
    assert isinstance(qmodel, QuantCNN)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    x = _images(kind, 0)
    fp = model(x)
    assert fp.std().item() > 0.3  # a non-degenerate model, so the bound below means something
    assert (qmodel(x) - fp).abs().max().item() <= 1e-4 * max(1.0, fp.abs().max().item())


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_timm_weight_is_quantized_once_and_listed_in_the_map(kind):
    model = _timm(kind)
    timm_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    qmodel = quantize_model(model, QuantConfig(w_bits=3), MODELS[kind][0])
    layers = [m for m in qmodel.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(isinstance(m, QLinear | QConv2d) for m in layers)
    assert len(layers) == len(timm_convs) + 1  # every conv (folded) and the classifier
    owned = {id(m.weight) for m in layers} | {id(m.bias) for m in layers}
    assert all(id(p) in owned for p in qmodel.parameters())  # no float weight is left out
    weights = [r for r in qmodel.quant_map() if r["kind"] == "weight"]
    assert len(weights) == len(layers)
    assert all(r["bits"] == "uint3" and r["granularity"] == "channel(dim=0)" and r["bias_correction"] == "yes"
               for r in weights)
    acts = [r for r in qmodel.quant_map() if r["kind"] == "activation"]
    assert all((r["bits"], r["granularity"], r["observer"]) == ("uint8", "tensor", "omse") for r in acts)
    # the search holds every conv except the stem's (and MobileNetV2's head conv), as ViT leaves its patch embedding
    searched = [layer for block in qmodel.search_blocks() for layer in block.layers]
    assert len(searched) == len(set(map(id, searched))) == len(timm_convs) - (2 if kind == "mobilenetv2" else 1)
    assert len(qmodel.search_blocks()) == MODELS[kind][3] and qmodel.num_classes == 10


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@torch.no_grad()
def test_each_residual_block_output_is_timms_block_output_before_its_quantizer(kind):
    model = _timm(kind)
    qmodel = quantize_model(model, QuantConfig(), MODELS[kind][0]).eval()
    seen: list[torch.Tensor] = []
    for block in qmodel.blocks:
        block.q_out.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    expected: list[torch.Tensor] = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.register_forward_hook(lambda mod, inp, out: expected.append(out))
    x = _images(kind, 1)
    qmodel(x)
    model(x)
    assert len(seen) == len(expected) == 4
    for got, want in zip(seen, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MODELS))
@torch.no_grad()
def test_suffix_evaluation_equals_the_full_forward_for_every_search_block(kind):
    model, qmodel = _calibrated(kind)
    x = _images(kind, 3)
    full = qmodel(x)
    assert (full - model(x)).abs().max().item() > 1e-3  # quantization is on
    for i in range(len(qmodel.blocks) + 1):
        assert torch.equal(qmodel.forward_from(i, qmodel.forward_to(i, x)), full), i


@torch.no_grad()
def test_w8a8_calibration_gives_logits_close_to_fp_and_fp_mode_is_exact():
    model, qmodel = _calibrated("bottleneck", w_bits=8)
    x = _images("bottleneck", 4, 8)
    fp, quantized = model(x), qmodel(x)
    err = (quantized - fp).abs()
    assert err.max().item() > 1e-4
    assert err.mean().item() < 0.05 * fp.std().item()
    with quantization_disabled(qmodel):
        assert (qmodel(x) - fp).abs().max().item() <= 1e-4 * max(1.0, fp.abs().max().item())
    assert torch.equal(qmodel(x), quantized)


@pytest.mark.parametrize(("name", "blocks", "convs"), [("resnet18", 8, (2, 2, 3, 2)), ("resnet50", 16, (4, 3, 3, 4)),
                                                       ("mobilenetv2_100", 17, (2, 3, 3, 3))])
def test_issue_models_have_one_search_block_per_residual_block(name, blocks, convs):
    qmodel = create_quantized_model(name, QuantConfig(w_bits=4), pretrained=False)
    assert isinstance(qmodel, QuantCNN) and qmodel.num_classes == 1000
    searched = qmodel.search_blocks()
    assert len(searched) == blocks
    assert tuple(len(b.layers) for b in searched[:4]) == convs  # a shortcut conv where the shape changes
    assert all(b.bits == 4 for b in searched)
    with pytest.raises(ValueError, match="search_mlp applies to transformer"):
        qmodel.search_blocks(include_mlp=True)


@pytest.mark.parametrize(("name", "kwargs", "needs"), [
    ("resnet18d", {}, "plain 7x7 stem"),
    ("resnet18", {"avg_down": True}, "conv\\+BN shortcuts"),
    ("seresnet18", {}, "without attention"),
    ("resnet18", {"global_pool": "max"}, "global average pooling"),
    ("efficientnet_b0", {}, "without squeeze-excitation"),
])
def test_unsupported_variants_are_rejected_with_a_reason(name, kwargs, needs):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    with pytest.raises(ValueError, match=f"unsupported (ResNet|EfficientNet) variant: .*{needs}"):
        quantize_model(model, QuantConfig(), name)


class _Stop(Callback):
    """Stops the run like a pre-emption before generation ``at``, after the previous checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated pre-emption")


def _fit(folder, ckpt: str, callbacks=(), ckpt_path=None) -> tuple[EvolQModule, Trainer]:
    m = EvolQModule(model_name="resnet18", checkpoint_path=ckpt, w_bits=3, num_passes=1, population_size=4,
                    tournament_size=3, num_cycles=2, seed=1)
    saver = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=folder, inference_mode=False, callbacks=[saver, *callbacks],
                      max_epochs=m.engine.num_visits)
    data = DemoDataModule(calib_size=64, heldout_size=0, batch_size=32, generations_per_epoch=2)
    trainer.fit(m, datamodule=data, ckpt_path=ckpt_path)
    return m, trainer


def _scales(m: EvolQModule) -> list[torch.Tensor]:
    return [layer.weight_quantizer.scale.clone() for b in m.blocks for layer in b.layers]


def test_tiny_resnet_search_changes_conv_scales_and_resumes_bit_for_bit(tmp_path):
    """A 1-channel 28 px ResNet (the demo images) through the Lightning module: 4 blocks x 2 generations."""
    model = _timm("basic", in_chans=1)
    ckpt = tmp_path / "tiny_resnet.pth"
    kwargs = {**SMALL, "in_chans": 1}
    torch.save({"state_dict": model.state_dict(), "meta": {"model_kwargs": kwargs}}, ckpt)
    ref, trainer = _fit(tmp_path / "ref", str(ckpt))
    assert trainer.global_step == 4 * 2
    assert ref.current_fitness < ref.baseline_fitness  # the search found better conv scales
    with pytest.raises(RuntimeError, match="pre-emption"):
        _fit(tmp_path / "cut", str(ckpt), callbacks=[_Stop(3)])
    resumed, trainer = _fit(tmp_path / "cut", str(ckpt), ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert trainer.global_step == 4 * 2
    assert all(torch.equal(a, b) for a, b in zip(_scales(resumed), _scales(ref), strict=True))
    assert resumed.current_fitness == ref.current_fitness


def test_activation_quantizers_are_all_calibrated_and_per_tensor():
    _, qmodel = _calibrated("mobilenetv2")
    acts = [m for n, m in qmodel.named_modules() if isinstance(m, FakeQuantizer) and not n.endswith("weight_quantizer")]
    assert acts and all(bool(q.calibrated) and q.dim is None for q in acts)
