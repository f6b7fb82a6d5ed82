"""QuantSwin on tiny timm Swin Transformers: FP equivalence (shifted windows, masks, padding, patch merging), the
tensor map, suffix evaluation, calibration, checkpoints and the search blocks of the paper-size models."""

import copy
import io

import pytest
import timm
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from evolq_pl.data import DemoDataModule
from evolq_pl.models import create_quantized_model
from evolq_pl.models.swin import QuantSwin
from evolq_pl.module import EvolQModule
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import calibrate, quantization_disabled, set_quantized
from evolq_pl.quant.quantizer import FakeQuantizer

NAME = "swin_tiny_patch4_window7_224"
# 32 px in patches of 2: a 16x16 grid in windows of 4, then 8x8 after patch merging; both stages shift with a mask
TINY = {"img_size": 32, "patch_size": 2, "embed_dim": 24, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4,
        "num_classes": 10}


@torch.no_grad()
def tiny_swin(seed: int = 0, **kwargs) -> nn.Module:
    """A tiny random Swin whose attention, position biases and LayerNorm affines all matter (timm's std-0.02 init
    makes attention uniform and the biases negligible)."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **{**TINY, **kwargs}).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0, m.in_features ** -0.5)
            if m.bias is not None:
                m.bias.normal_(0, 0.1)
        elif isinstance(m, nn.LayerNorm):
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)
        if hasattr(m, "relative_position_bias_table"):
            m.relative_position_bias_table.normal_(0, 1)
    return model


def _images(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _calibrated(seed: int = 0, **cfg) -> tuple[nn.Module, QuantSwin]:
    model = tiny_swin(seed)
    qmodel = QuantSwin(model, QuantConfig(**cfg), NAME).eval()
    calibrate(qmodel, [_images(10, 8), _images(11, 8)])
    return model, qmodel


@pytest.fixture(scope="module")
def calibrated_w8() -> tuple[nn.Module, QuantSwin]:
    return _calibrated(w_bits=8)


@pytest.mark.parametrize("kwargs", [{}, {"img_size": 20, "depths": (2, 2, 1), "num_heads": (2, 2, 4)}])
@torch.no_grad()
def test_quantization_off_reproduces_timm_logits(kwargs):
    """Also at 20 px: a 10x10 grid padded to windows of 4, then 5x5 (padded, shifted) merged with padding to 3x3."""
    model = tiny_swin(**kwargs)
    assert any(b.attn_mask is not None for s in model.layers for b in s.blocks)  # shifted windows are tested
    qmodel = QuantSwin(model, QuantConfig(), NAME).eval()
    x = _images(0, size=model.patch_embed.img_size[0])
    fp = model(x)
    assert fp.std().item() > 0.3
    assert (qmodel(x) - fp).abs().max().item() <= 1e-4


def test_every_weight_is_quantized_and_shared_with_timm():
    model = tiny_swin()
    qmodel = QuantSwin(model, QuantConfig(), NAME)
    layers = [m for m in qmodel.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(isinstance(m, QLinear | QConv2d) for m in layers)
    timm_layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert len(layers) == len(timm_layers) == 1 + 4 * 4 + 1 + 1  # patch conv, 4 blocks, one merging, head
    assert {id(m.weight) for m in layers} == {id(m.weight) for m in timm_layers}
    assert {id(p) for p in qmodel.parameters()} == {id(p) for p in model.parameters()}  # biases tables too
    weights = {r["tensor"] for r in qmodel.quant_map() if r["kind"] == "weight"}
    names = {id(m): n for n, m in qmodel.named_modules()}
    assert weights == {names[id(m)] for m in layers}
    assert qmodel.num_classes == 10


def test_faithful_leaves_bias_correction_off_as_the_original_swin():
    rows = QuantSwin(tiny_swin(), QuantConfig(faithful=True), NAME).quant_map()
    weights = [r for r in rows if r["kind"] == "weight"]
    assert len(weights) == 19 and all(r["bias_correction"] == "" for r in weights)
    assert all(r["bias_correction"] == "yes" for r in QuantSwin(tiny_swin(), QuantConfig(), NAME).quant_map()
               if r["kind"] == "weight")


@torch.no_grad()
def test_activation_quantizers_see_the_timm_blocks_tensors():
    """In FP mode each block's residual sums and the merging's output are what timm's own modules compute."""
    model = tiny_swin()
    qmodel = QuantSwin(model, QuantConfig(), NAME).eval()
    seen = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, FakeQuantizer) and not name.endswith("weight_quantizer"):
            m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    x = _images(2)
    qmodel(x)
    h = model.patch_embed(x)
    expected = {"q_input": x, "q_embed": h}
    for s, stage in enumerate(model.layers):
        if isinstance(stage.downsample, nn.Module) and not isinstance(stage.downsample, nn.Identity):
            h = expected[f"stages.{s}.downsample.q_out"] = stage.downsample(h)
        for j, block in enumerate(stage.blocks):
            p = f"stages.{s}.blocks.{j}"
            expected[f"{p}.q_ln1"] = block.norm1(h)
            expected[f"{p}.q_res1"] = h + block._attn(block.norm1(h))
            h = expected[f"{p}.q_out"] = block(h)
    expected["q_pool"] = model.norm(h).mean(dim=(1, 2))
    expected["q_logits"] = model(x)
    for name, tensor in expected.items():
        assert seen[name].shape[-1] == tensor.shape[-1], name
        assert torch.allclose(seen[name].reshape(tensor.shape), tensor, atol=1e-4, rtol=1e-4), name
    rows = {r["tensor"]: r for r in qmodel.quant_map() if r["kind"] == "activation"}
    ptf = {n for n, r in rows.items() if r["observer"] == "ptf"}
    blocks = [f"stages.{s}.blocks.{j}" for s in range(2) for j in range(2)]
    assert ptf == {"q_patch", "stages.1.downsample.q_out"} | {f"{b}.{q}" for b in blocks for q in ("q_res1", "q_out")}
    assert all(r["granularity"] == "channel(dim=-1)" for n, r in rows.items() if n in ptf)


@pytest.mark.parametrize("softmax", ["uniform", "log2", "lis"])
@torch.no_grad()
def test_suffix_evaluation_equals_the_full_forward_for_every_search_block(softmax):
    _, qmodel = _calibrated(softmax=softmax, softmax_bits=8 if softmax == "uniform" else 4)
    x = _images(3)
    full = qmodel(x)
    assert len(qmodel.search_blocks()) == 4
    for i in range(5):
        assert torch.equal(qmodel.forward_from(i, qmodel.forward_to(i, x)), full), i


@torch.no_grad()
def test_w8a8_calibration_gives_logits_close_to_fp_and_fp_mode_is_exact(calibrated_w8):
    model, qmodel = calibrated_w8
    x = _images(4, 8)
    fp, quantized = model(x), qmodel(x)
    err = (quantized - fp).abs()
    assert err.max().item() > 1e-3  # quantization is on
    assert err.mean().item() < 0.1 * fp.std().item()
    assert (quantized.argmax(1) == fp.argmax(1)).float().mean().item() >= 0.75
    with quantization_disabled(qmodel):
        assert (qmodel(x) - fp).abs().max().item() <= 1e-4
    assert torch.equal(qmodel(x), quantized)


@torch.no_grad()
def test_position_bias_tables_are_read_at_each_forward_and_follow_dtype(calibrated_w8):
    model, qmodel = copy.deepcopy(calibrated_w8)
    x = _images(5)
    with quantization_disabled(qmodel):
        qmodel(x)
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.mul_(-1.5)  # shared with the quantized model
        assert (qmodel(x) - model(x)).abs().max().item() <= 1e-4
        qmodel.double()
        assert (qmodel(x.double()) - model.double()(x.double())).abs().max().item() <= 1e-6


@torch.no_grad()
def test_calibrated_state_dict_loads_into_a_fresh_model_with_identical_logits(calibrated_w8):
    _, qmodel = calibrated_w8
    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    buffer.seek(0)
    fresh = QuantSwin(tiny_swin(), QuantConfig(w_bits=8), NAME).eval()
    with pytest.raises(RuntimeError, match="not calibrated"):
        set_quantized(fresh, True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    set_quantized(fresh, True)
    x = _images(6)
    assert torch.equal(fresh(x), qmodel(x))


def test_swin_tiny_has_one_search_block_per_swin_block_in_forward_order():
    qmodel = create_quantized_model(f"{NAME}.ms_in1k", QuantConfig(w_bits=3), pretrained=False)
    assert isinstance(qmodel, QuantSwin) and qmodel.num_classes == 1000
    blocks = qmodel.search_blocks()
    assert [b.name for b in blocks] == [f"stages.{s}.blocks.{j}" for s, d in enumerate((2, 2, 6, 2)) for j in range(d)]
    attn = qmodel.stages[2].blocks[5].attn
    assert blocks[9].layers == (attn.qkv, attn.proj) and blocks[9].bits == 3
    b0 = qmodel.stages[0].blocks[0]
    assert qmodel.search_blocks(include_mlp=True)[0].layers == (b0.fc1, b0.fc2, b0.attn.qkv, b0.attn.proj)


def test_lightning_module_schedules_every_swin_block():
    module = EvolQModule(model_name=NAME, pretrained=False, model_kwargs=TINY, num_passes=2, w_bits=8)
    assert len(module.blocks) == 4
    assert module.engine.schedule == [3, 2, 1, 0] * 2
    assert module.test_accuracy["top1"].num_classes == 10


@pytest.mark.parametrize(("kwargs", "reason"), [({"strict_img_size": False}, "fixed image size"),
                                                ({"global_pool": "max"}, "average pooling"),
                                                ({"num_classes": 0}, "Linear classifier")])
def test_unsupported_variants_are_rejected_with_a_reason(kwargs, reason):
    model = timm.create_model(NAME, pretrained=False, **{**TINY, **kwargs}).eval()
    with pytest.raises(ValueError, match=f"unsupported SwinTransformer variant.*{reason}"):
        QuantSwin(model, QuantConfig(), NAME)


def _fit(root, callbacks=(), ckpt_path=None) -> tuple[EvolQModule, Trainer]:
    """A whole search (4 blocks x 2 generations, one pass) of a tiny random 1-channel Swin on the demo images."""
    torch.manual_seed(0)  # the same random FP weights in every run
    module = EvolQModule(model_name=NAME, pretrained=False, model_kwargs={**TINY, "in_chans": 1}, w_bits=3,
                         num_passes=1, population_size=4, tournament_size=3, num_cycles=2, eps=3e-3, seed=3)
    saver = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, inference_mode=False, callbacks=[saver, *callbacks],
                      max_epochs=module.engine.num_visits)
    data = DemoDataModule(calib_size=32, heldout_size=0, batch_size=16, image_size=32,
                          generations_per_epoch=module.hparams.num_cycles)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


class _Crash(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("simulated pre-emption")


def test_lightning_fit_searches_every_block_and_a_resumed_fit_ends_bitwise_equal(tmp_path):
    ref, trainer = _fit(tmp_path / "ref")
    assert trainer.global_step == 4 * 2
    scales = [layer.weight_quantizer.scale.clone() for b in ref.blocks for layer in b.layers]
    with pytest.raises(RuntimeError, match="pre-emption"):
        _fit(tmp_path / "cut", callbacks=[_Crash()])
    resumed, trainer = _fit(tmp_path / "cut", ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert trainer.global_step == 4 * 2
    after = [layer.weight_quantizer.scale for b in resumed.blocks for layer in b.layers]
    assert all(torch.equal(a, b) for a, b in zip(after, scales, strict=True))
    assert resumed.current_fitness == ref.current_fitness


def test_images_of_another_size_than_the_swin_was_built_for_are_refused(calibrated_w8):
    _, qmodel = calibrated_w8
    qmodel.check_input(_images(0))
    with pytest.raises(ValueError, match=r"images of 3x48x48 \(channels x height x width\) do not fit "
                                         r"swin_tiny_patch4_window7_224, built for 3x32x32"):
        qmodel.check_input(_images(0, size=48))
