"""Model-wide switches: calibration over a loader, quantized mode, FP mode as a reversible context."""

import pytest
import torch
from torch import nn

from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.layers import QIntLayerNorm, QLinear
from evolq_pl.quant.modes import calibrate, quantization_disabled, quantized_parts, quantizers, set_quantized
from evolq_pl.quant.observers import OMSEObserver, PTFObserver
from evolq_pl.quant.quantizer import FakeQuantizer

UINT4, UINT8 = BitType(4, False), BitType(8, False)


class Toy(nn.Module):
    """Three observers side by side on the input, a quantized linear layer and a quantizer on its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_minmax = FakeQuantizer(UINT8, "minmax")
        self.q_omse = FakeQuantizer(UINT4, "omse")
        self.q_ptf = FakeQuantizer(UINT8, "ptf", channels=4, dim=-1)
        self.fc = QLinear.from_float(nn.Linear(4, 4), UINT4)
        self.q_out = FakeQuantizer(UINT8, "minmax")

    def forward(self, x):
        return self.q_minmax(x) + self.q_omse(x) + self.q_ptf(x) + self.q_out(self.fc(x))


def _batches(seed: int = 0):
    """Two batches of very different spread, as (images, labels) pairs like a DataLoader yields."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(8, 3, 4, generator=g) * torch.tensor([4.0, 4.0, 0.5, 2.0])
    narrow = torch.randn(8, 3, 4, generator=g) * torch.tensor([0.05, 1.0, 0.5, 2.0])
    return [(wide, torch.zeros(8)), (narrow, torch.zeros(8))]


def _fit(observer, batches, scored):
    for x, _ in batches:
        observer.observe(x)
    for x, _ in scored:
        observer.score(x)
    return observer.qparams()


def test_calibrate_observes_every_batch_and_leaves_the_model_quantized():
    model, batches = Toy(), _batches()
    assert calibrate(model, batches) == 2
    everything = torch.cat([x for x, _ in batches])
    expected = (everything.max() - everything.min()) / 255
    assert model.q_minmax.scale.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(bool(q.calibrated) and q.enabled for _, q in quantizers(model))
    x = batches[0][0]
    with quantization_disabled(model):
        fp = model(x)
    assert not torch.equal(model(x), fp)


def test_omse_and_ptf_score_only_the_last_batch_by_default():
    model, batches = Toy(), _batches()
    calibrate(model, batches)
    scale, zero_point = _fit(OMSEObserver(UINT4), batches, scored=batches[-1:])
    assert torch.equal(model.q_omse.scale, scale) and torch.equal(model.q_omse.zero_point, zero_point)
    scale, zero_point = _fit(PTFObserver(UINT8, dim=-1), batches, scored=batches[-1:])
    assert torch.equal(model.q_ptf.scale, scale) and torch.equal(model.q_ptf.zero_point, zero_point)


def test_fit_on_all_scores_every_batch_and_differs_when_batches_differ():
    last, every = Toy(), Toy()
    batches = _batches()
    calibrate(last, batches)
    calibrate(every, batches, fit_on="all")
    scale, _ = _fit(OMSEObserver(UINT4), batches, scored=batches)
    assert torch.equal(every.q_omse.scale, scale)
    scale, _ = _fit(PTFObserver(UINT8, dim=-1), batches, scored=batches)
    assert torch.equal(every.q_ptf.scale, scale)
    assert not torch.equal(last.q_omse.scale, every.q_omse.scale)
    assert not torch.equal(last.q_ptf.scale, every.q_ptf.scale)
    assert torch.equal(last.q_minmax.scale, every.q_minmax.scale)  # min-max has nothing to score


def test_fit_on_must_be_last_or_all():
    with pytest.raises(ValueError, match="'last' or 'all'"):
        calibrate(Toy(), _batches(), fit_on="first")


def test_empty_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="yielded no batches"):
        calibrate(Toy(), [])


def test_quantizing_an_uncalibrated_model_raises():
    model = Toy()
    with pytest.raises(RuntimeError, match="not calibrated"):
        set_quantized(model, True)
    set_quantized(model, False)  # switching off needs no calibration


def test_recalibrating_gives_the_same_parameters_as_the_first_calibration():
    model, batches = Toy(), _batches()
    calibrate(model, batches)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, batches)  # the model is now in quantized mode: observers must still see FP activations
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k]), k


def test_fit_on_all_refuses_a_one_shot_iterator_that_it_cannot_read_twice():
    with pytest.raises(ValueError, match="reads the calibration batches twice"):
        calibrate(Toy(), iter(_batches()), fit_on="all")
    model, reference = Toy(), Toy()
    calibrate(model, iter(_batches()))  # one pass is enough for the default
    calibrate(reference, _batches())
    assert torch.equal(model.q_omse.scale, reference.q_omse.scale)


def test_calibration_restores_train_mode():
    model = Toy().train()
    calibrate(model, _batches())
    assert model.training


def test_set_quantized_switches_every_quantizer_and_is_reversible():
    model, batches = Toy(), _batches()
    calibrate(model, batches)
    x = batches[1][0]
    quantized = model(x)
    set_quantized(model, False)
    assert not any(q.enabled for _, q in quantizers(model))
    fp = model(x)
    set_quantized(model, True)
    assert torch.equal(model(x), quantized)
    assert not torch.equal(fp, quantized)


class Normed(nn.Module):
    """PTF input -> integer LayerNorm -> output quantizer, the pattern of every transformer block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.q_in = FakeQuantizer(UINT8, "ptf", channels=4, dim=-1)
        self.norm = QIntLayerNorm(4)
        self.q_out = FakeQuantizer(UINT8, "omse")

    def forward(self, x):
        x = self.q_in(x)
        return self.q_out(self.norm(x, self.q_in, self.q_out))


def test_quantization_disabled_restores_the_previous_state_and_keep_int_norm_keeps_integer_layernorm():
    model, batches = Normed(), _batches()
    calibrate(model, batches)
    x = batches[0][0]
    quantized = model(x)
    fp_ref = nn.functional.layer_norm(x, (4,), model.norm.weight, model.norm.bias, model.norm.eps)
    with quantization_disabled(model):
        assert torch.equal(model(x), fp_ref)
    with quantization_disabled(model, keep_int_norm=True):
        teacher = model(x)
        assert model.norm.int_mode
    assert not torch.allclose(teacher, fp_ref, atol=1e-3)
    assert torch.equal(model(x), quantized)  # the context put everything back
    assert model.norm.int_mode and model.q_in.enabled


def test_quantized_parts_switches_weights_activations_and_int_norm_apart_and_restores():
    toy, batches = Toy(), _batches()
    calibrate(toy, batches)
    x = batches[1][0]
    quantized = toy(x)
    with quantized_parts(toy, activations=False):
        assert toy.fc.weight_quantizer.enabled and not toy.q_out.enabled and not toy.q_ptf.enabled
        weights_only = toy(x)
        assert torch.equal(weights_only, 3 * x + toy.fc(x))
    with quantized_parts(toy, weights=False):
        assert not toy.fc.weight_quantizer.enabled and toy.q_out.enabled
        assert torch.equal(toy.fc(x), nn.functional.linear(x, toy.fc.weight, toy.fc.bias))
    assert torch.equal(toy(x), quantized)
    with quantized_parts(toy, activations=False, only_layers=[]):  # no layer kept: the FP model
        assert not any(q.enabled for _, q in quantizers(toy))
    with quantized_parts(toy, activations=False, only_layers=[toy.fc]):
        assert torch.equal(toy(x), weights_only)
    normed = Normed()
    calibrate(normed, batches)
    with quantized_parts(normed, int_norm=False):
        assert not normed.norm.int_mode and normed.q_in.enabled
    assert normed.norm.int_mode
