"""Fitness functions: hand-computed InfoNCE, invariances, dtypes, errors and the per-batch accumulator."""

from __future__ import annotations

import math

import pytest
import torch

from evolq_pl.fitness import FITNESSES, FitnessAccumulator, cosine, get_fitness, infonce, kl, mse


def test_infonce_2x2_by_hand() -> None:
    # After normalisation: student rows [1,0], [0.6,0.8]; teacher [0,2] -> [0,1], [3,0] -> [1,0].
    student = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    teacher = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    t = 3.0
    # sim = q @ k.T = [[0, 1], [0.8, 0.6]]
    row0 = -(0.0 / t) + math.log(math.exp(0.0 / t) + math.exp(1.0 / t))
    row1 = -(0.6 / t) + math.log(math.exp(0.8 / t) + math.exp(0.6 / t))
    expected = 2 * t * (row0 + row1) / 2
    assert infonce(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_3x3_by_hand() -> None:
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    t = 0.5
    # q = [[1,0,0],[0,0,1],[0,1,0]], k = I, so sim = q; the diagonal of q is [1, 0, 0].
    sims = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    rows = [-sims[i][i] / t + math.log(sum(math.exp(v / t) for v in sims[i])) for i in range(3)]
    expected = 2 * t * sum(rows) / 3
    assert infonce(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)


def test_identical_logits_are_minimal_among_perturbations() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 10, generator=g) * 3
    for name in FITNESSES:
        fn = get_fitness(name, 3.0)
        at_teacher = fn(teacher, teacher).item()
        for _ in range(5):
            perturbed = teacher + 0.5 * torch.randn(6, 10, generator=g)
            assert at_teacher < fn(perturbed, teacher).item(), name


def test_infonce_is_scale_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    base = infonce(s, t).item()
    assert infonce(5.0 * s, 0.25 * t).item() == pytest.approx(base, rel=1e-5)


def test_kl_and_others_zero_for_equal_inputs() -> None:
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    assert kl(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert mse(x, x).item() == 0.0
    assert cosine(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_direction_by_hand() -> None:
    student = torch.tensor([[0.0, math.log(3.0)]])  # softmax [0.25, 0.75]
    teacher = torch.tensor([[0.0, 0.0]])  # softmax [0.5, 0.5]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_bf16_input_gives_float32_output() -> None:
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    for name in FITNESSES:
        out = get_fitness(name)(x.bfloat16(), x.bfloat16() + 0.1)
        assert out.dtype == torch.float32 and out.dim() == 0, name


def test_errors() -> None:
    with pytest.raises(ValueError, match="infonce"):
        get_fitness("contrastiv")
    with pytest.raises(ValueError, match="temperature"):
        get_fitness("infonce", 0.0)
    with pytest.raises(ValueError, match="temperature"):
        infonce(torch.ones(2, 2), torch.ones(2, 2), temperature=-1.0)
    with pytest.raises(ValueError, match="shape"):
        mse(torch.ones(2, 3), torch.ones(3, 2))


def test_accumulator_is_a_mean_over_batches() -> None:
    acc = FitnessAccumulator()
    with pytest.raises(ValueError):
        acc.mean()
    for v in (torch.tensor(1.0), 2.0, torch.tensor([4.5])):
        acc.add(v)
    assert acc.count().item() == 3
    assert acc.total().item() == pytest.approx(7.5)
    assert acc.mean() == pytest.approx(2.5)
    # Two "ranks" reduced by summing totals and counts give the global batch mean.
    other = FitnessAccumulator()
    other.add(10.0)
    assert FitnessAccumulator.mean_of(
        acc.total() + other.total(), acc.count() + other.count()
    ) == pytest.approx(4.375)
    acc.reset()
    assert acc.count().item() == 0 and acc.total().item() == 0.0
