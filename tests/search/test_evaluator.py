"""SuffixEvaluator.evaluate_many: several candidates in one pass give each candidate's one-by-one fitness, and a
share of the calibration set is scored on its first batches; for every unit, the blocks and the head and stem after
them (``search_head``, ``search_stem``)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from evolq_pl.fitness import get_fitness
from evolq_pl.models.levit import QuantLevit
from evolq_pl.models.vit import QuantViT
from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import calibrate, quantization_disabled
from evolq_pl.search.evaluator import SuffixEvaluator
from evolq_pl.search.evolution import mutate
from evolq_pl.testing import unit_gain_vit


def _images(seed: int, n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vit() -> QuantViT:
    return QuantViT(unit_gain_vit("deit_tiny_patch16_224", 0, depth=2), QuantConfig(w_bits=3), "deit").eval()


@torch.no_grad()
def _levit() -> QuantLevit:
    """A tiny LeViT whose residual branches and BatchNorms matter (timm's init zeroes them: constant logits)."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, depth=(1, 1, 1), img_size=96, embed_dim=(32, 48, 64),
                              key_dim=8, num_heads=(2, 3, 4), num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.normal_(1, 0.3)
            m.bias.normal_(0, 0.3)
        elif isinstance(m, nn.Linear | nn.Conv2d):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5)
    return QuantLevit(model, QuantConfig(w_bits=3), "levit_128s").eval()


@pytest.fixture(params=["vit", "levit"])
def evaluator(request) -> SuffixEvaluator:
    qmodel, size = (_vit(), 32) if request.param == "vit" else (_levit(), 96)
    batches = [_images(s, 6, size) for s in range(3)]
    calibrate(qmodel, batches)
    with torch.no_grad(), quantization_disabled(qmodel):
        teachers = [qmodel(x).float() for x in batches]
    return SuffixEvaluator(qmodel, qmodel.search_blocks(include_head=True, include_stem=True), batches, teachers, get_fitness("infonce"),
                           torch.device("cpu"), stack=3)


def candidates(ev: SuffixEvaluator, block: int, count: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(block)
    base = ev.get(block)
    return [mutate(base, 0.05, rng, relative=True) for _ in range(count)]


def test_batched_fitness_is_the_one_by_one_fitness_for_every_block(evaluator):
    """Bitwise here (one thread; the stacked batch only adds rows to the shared layers' matrix products). Other
    kernels may round a row differently with the row count; the search then differs in the last bits only."""
    for block in range(len(evaluator.scales)):
        evaluator.start_block(block)
        cands = candidates(evaluator, block, 5)  # two passes of stack=3, the second not full
        one_by_one = [evaluator.evaluate(block, c) for c in cands]
        assert evaluator.evaluate_many(block, cands) == one_by_one, block
        evaluator.stack = 1  # the plain path a CPU takes
        assert evaluator.evaluate_many(block, cands) == one_by_one, block
        evaluator.stack = 3
        assert torch.equal(evaluator.get(block), cands[-1])  # the model holds the last candidate
        evaluator.end_block(block)


def test_a_share_of_the_calibration_set_is_scored_on_its_first_batches(evaluator):
    block = len(evaluator.scales) - 1
    evaluator.start_block(block)
    cands = candidates(evaluator, block, 2)
    assert evaluator.calibration_share(0.4) == pytest.approx(1 / 3)  # one whole batch of three
    part = evaluator.evaluate_many(block, cands, fraction=0.4)
    full_batches, evaluator._inputs = evaluator._inputs, evaluator._inputs[:1]
    teachers, evaluator.teachers = evaluator.teachers, evaluator.teachers[:1]
    assert part == [evaluator.evaluate(block, c) for c in cands]
    evaluator._inputs, evaluator.teachers = full_batches, teachers
    assert part != evaluator.evaluate_many(block, cands)
    with pytest.raises(ValueError, match=r"fraction of the calibration set must be in \(0, 1\], got 0"):
        evaluator.calibration_share(0)


def test_batched_evaluation_leaves_the_layers_as_they_were(evaluator):
    block = 0
    evaluator.start_block(block)
    layers = evaluator.scales[block].layers
    evaluator.evaluate_many(block, candidates(evaluator, block, 2))
    assert all("forward" not in vars(layer) for layer in layers)
    x = evaluator._inputs[0]
    assert torch.equal(evaluator.qmodel.forward_from(block, x), evaluator.qmodel.forward_from(block, x.clone()))


def _fp_output(layer: QLinear | QConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with its FP weight, in float64; channels last, one row per token or output position."""
    if isinstance(layer, QConv2d):
        out = nn.functional.conv2d(x, layer.weight.double(), layer.bias.double(), layer.stride, layer.padding,
                                   layer.dilation)
        return out.movedim(1, -1).reshape(-1, out.shape[1])
    return nn.functional.linear(x, layer.weight.double(), layer.bias.double())


@pytest.mark.parametrize("unit", ["last block", "stem"])
def test_local_errors_are_each_channels_output_error_against_its_fp_weight(evaluator, unit):
    """For every searched layer of the unit: ‖x ŵ_cᵀ − x w_cᵀ‖² over the calibration tokens x (a convolution's:
    its input patches) that reach the layer with the model as it stands, per output channel c, ŵ_c quantized with
    the candidate's scale."""
    block = len(evaluator.scales) - (3 if unit == "last block" else 1)
    evaluator.start_block(block)
    layers, current = evaluator.scales[block].layers, evaluator.get(block)
    inputs: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(layers))}
    handles = [layer.register_forward_hook(lambda m, a, o, j=j: inputs[j].append(a[0].detach()))
               for j, layer in enumerate(layers)]
    with torch.no_grad():
        for x in evaluator.batches:
            evaluator.qmodel(x)
    for h in handles:
        h.remove()
    cands = candidates(evaluator, block, 2)
    errors = evaluator.local_errors(block, cands)
    assert errors.shape == (2, current.numel()) and torch.equal(evaluator.get(block), current)  # nothing written
    for i, cand in enumerate(cands):
        expected = []
        evaluator.apply(block, cand)
        for j, layer in enumerate(layers):
            conv = isinstance(layer, QConv2d)
            x = torch.cat(inputs[j] if conv else [t.reshape(-1, t.shape[-1]) for t in inputs[j]]).double()
            with torch.no_grad():
                out = layer(x.float()).double()
                diff = (out.movedim(1, -1).reshape(-1, out.shape[1]) if conv else out) - _fp_output(layer, x)
            expected.append((diff ** 2).sum(dim=0))
        torch.testing.assert_close(errors[i], torch.cat(expected), rtol=1e-3, atol=1e-7)  # float32 layer outputs
    evaluator.end_block(block)


def _checked_gradient(evaluator: SuffixEvaluator, block: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The gradient at the block's scales, nonzero in every layer's, with the model's scales and layers untouched."""
    evaluator.start_block(block)
    current, before = evaluator.get(block), evaluator.fitness(block)
    grad = evaluator.gradient(block, current)
    assert grad.shape == current.shape and torch.isfinite(grad).all()
    assert all(chunk.abs().sum() > 0 for chunk in torch.split(grad, evaluator.scales[block].sizes))
    assert torch.equal(evaluator.get(block), current) and evaluator.fitness(block) == before
    assert all("forward" not in vars(layer) for layer in evaluator.scales[block].layers)
    return grad, current, before


def test_the_gradient_is_nonzero_in_every_layers_scales_and_a_step_against_it_lowers_the_fitness(evaluator):
    """Through straight-through rounding and the integer steps' float stand-ins; the model's scales stay put. The
    fitness is jagged in the scales, so not every step size along the direction lowers it (as the strategy tries
    several)."""
    block = 0
    grad, current, before = _checked_gradient(evaluator, block)
    direction = grad * current
    step = direction / direction.pow(2).mean().sqrt()
    assert min(evaluator.evaluate(block, current * torch.exp(-size * step)) for size in (0.003, 0.01, 0.03, 0.1)) < before
    evaluator.end_block(block)


@pytest.mark.parametrize("unit", ["head", "stem"])
def test_the_gradient_reaches_the_head_and_the_stem_scales(evaluator, unit):
    """The stem's convolutions (rerun from the images) and the head's Linear layers pass it too."""
    _checked_gradient(evaluator, len(evaluator.scales) - (2 if unit == "head" else 1))


def test_the_gradient_on_a_share_is_the_gradient_on_its_first_batches(evaluator):
    block = len(evaluator.scales) - 1
    evaluator.start_block(block)
    current = evaluator.get(block)
    part = evaluator.gradient(block, current, fraction=0.4)
    evaluator._inputs, evaluator.teachers = evaluator._inputs[:1], evaluator.teachers[:1]
    assert torch.equal(part, evaluator.gradient(block, current))
