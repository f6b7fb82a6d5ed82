"""Observers choose (scale, zero_point) as evolq-reference §1.4 says; OMSE and PTF are checked by brute force."""

import pytest
import torch

from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.observers import (
    EMAObserver,
    MinMaxObserver,
    OMSEObserver,
    PercentileObserver,
    PTFObserver,
    build_observer,
)
from evolq_pl.quant.quantizer import FakeQuantizer

UINT4, UINT8, INT8 = BitType(4, False), BitType(8, False), BitType(8, True)


def _asym_qparams(lo: float, hi: float, bt: BitType) -> tuple[float, float]:
    s = (hi - lo) / (bt.qmax - bt.qmin)
    z = min(max(bt.qmin - round(lo / s), bt.qmin), bt.qmax)
    return s, float(z)


def _mse(x: torch.Tensor, s, z, bt: BitType) -> float:
    q = torch.clamp(torch.round(x / s + z), bt.qmin, bt.qmax)
    return float(((q - z) * s - x).pow(2).mean())


def test_minmax_unsigned_is_asymmetric_over_the_running_range_of_all_batches():
    obs = MinMaxObserver(UINT8)
    obs.observe(torch.tensor([-1.0, 0.5]))
    obs.observe(torch.tensor([0.0, 3.0]))
    scale, zero_point = obs.qparams()
    assert torch.allclose(scale, torch.tensor([4.0 / 255]))
    assert zero_point.item() == 64  # round(1 / (4/255)) = round(63.75)


def test_minmax_signed_is_symmetric_and_divides_int8_range_by_127_5():
    obs = MinMaxObserver(INT8)
    obs.observe(torch.tensor([-1.0, 3.0, 0.2]))
    scale, zero_point = obs.qparams()
    assert torch.allclose(scale, torch.tensor([3.0 / 127.5]))
    assert zero_point.item() == 0


def test_minmax_per_channel_weight_rows_and_activation_last_dim():
    w = torch.tensor([[-1.0, 2.0, 0.0], [0.0, 0.5, 0.25]])
    obs = MinMaxObserver(UINT4, dim=0)
    obs.observe(w)
    scale, zero_point = obs.qparams()
    assert torch.allclose(scale, torch.tensor([3.0 / 15, 0.5 / 15]))
    assert torch.equal(zero_point, torch.tensor([5.0, 0.0]))

    act = torch.zeros(2, 3, 2)
    act[0, 0] = torch.tensor([-2.0, 1.0])
    act[1, 2] = torch.tensor([4.0, -0.5])
    obs = MinMaxObserver(UINT8, dim=-1)
    obs.observe(act)
    scale, _ = obs.qparams()
    assert torch.allclose(scale, torch.tensor([6.0 / 255, 1.5 / 255]))


def test_ema_moves_min_and_max_by_one_percent_per_batch():
    obs = EMAObserver(UINT8)
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.observe(torch.tensor([-3.0, 5.0]))
    assert obs.min_val.item() == pytest.approx(-1.02)
    assert obs.max_val.item() == pytest.approx(1.04)
    scale, zero_point = obs.qparams()
    assert scale.item() == pytest.approx(2.06 / 255)
    assert zero_point.item() == 126  # round(1.02 / (2.06/255)) = round(126.27)


def test_percentile_ignores_a_single_outlier_that_minmax_follows():
    x = torch.cat([torch.linspace(0, 1, 100_001), torch.tensor([1000.0])])
    obs = PercentileObserver(UINT8)
    obs.observe(x)
    assert obs.max_val.item() == pytest.approx(float(torch.quantile(x, 0.99999)), rel=1e-6)
    assert obs.max_val.item() < 1.01
    assert obs.min_val.item() == pytest.approx(1e-5, abs=1e-6)
    minmax = MinMaxObserver(UINT8)
    minmax.observe(x)
    assert obs.qparams()[0].item() < minmax.qparams()[0].item() / 100


def test_percentile_averages_batches_with_ema():
    obs = PercentileObserver(UINT8)
    x = torch.linspace(0, 1, 1001)
    obs.observe(x)
    first = obs.max_val.item()
    obs.observe(2 * x)
    assert obs.max_val.item() == pytest.approx(first + 0.01 * first, rel=1e-5)


def test_percentile_is_per_tensor_only():
    with pytest.raises(ValueError, match="per-tensor only"):
        PercentileObserver(UINT8, dim=0)
    with pytest.raises(ValueError, match="per-tensor only"):
        FakeQuantizer(UINT8, "percentile", channels=4, dim=0)


def test_unknown_observer_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="minmax, ema, percentile, omse, ptf"):
        build_observer("kl", UINT8, None)


def _omse_brute_force(x: torch.Tensor, lo: float, hi: float, bt: BitType) -> tuple[int, float, float]:
    best = None
    for i in range(90):
        r = 1 - 0.01 * i
        s, z = _asym_qparams(lo * r, hi * r, bt)
        err = _mse(x, s, z, bt)
        if best is None or err < best[0]:
            best = (err, i, s, z)
    return best[1], best[2], best[3]


def test_omse_picks_the_shrink_ratio_with_the_lowest_mse_found_by_brute_force():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    q = FakeQuantizer(UINT4, "omse")
    q.fit(x)
    i, s, z = _omse_brute_force(x, x.min().item(), x.max().item(), UINT4)
    assert i > 5  # the case is one where shrinking the range pays off
    assert q.scale.item() == pytest.approx(s, rel=1e-5)
    assert q.zero_point.item() == z
    assert q.scale.item() < (x.max() - x.min()).item() / 15 * 0.95


def test_omse_uses_one_ratio_per_tensor_even_per_channel():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 256, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [0.5]])
    q = FakeQuantizer(UINT4, "omse", channels=4, dim=0)
    q.fit(w)
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    ratios = q.scale * 15 / (hi - lo)
    assert torch.allclose(ratios, ratios[0].expand(4), rtol=1e-5)
    errors = []
    for i in range(90):  # brute force: the same ratio for every row, each row its own min/max
        s = ((hi - lo) * (1 - 0.01 * i) / 15).unsqueeze(1)
        z = torch.clamp(-torch.round(lo.unsqueeze(1) * (1 - 0.01 * i) / s), 0, 15)
        errors.append(_mse(w, s, z, UINT4))
    best = errors.index(min(errors))
    assert best > 0
    assert ratios[0].item() == pytest.approx(1 - 0.01 * best, rel=1e-5)


def test_omse_is_asymmetric_even_for_a_signed_type():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(2)) * 10 + 0.01  # all positive
    omse = FakeQuantizer(INT8, "omse")
    omse.fit(x)
    assert omse.zero_point.item() == -128  # the grid starts at min, not at -max
    ratio = omse.scale.item() * 255 / (x.max() - x.min()).item()
    assert 0.1 < ratio <= 1.0 + 1e-6
    minmax = FakeQuantizer(INT8, "minmax")
    minmax.fit(x)
    assert minmax.zero_point.item() == 0 and minmax.scale.item() == pytest.approx(x.max().item() / 127.5)


def test_omse_scores_only_what_it_is_given_while_the_range_spans_every_batch():
    g = torch.Generator().manual_seed(3)
    first, last = torch.randn(500, generator=g) * 4, torch.randn(500, generator=g)
    obs = OMSEObserver(UINT4)
    obs.observe(first)
    obs.observe(last)
    obs.score(last)
    lo, hi = torch.minimum(first.min(), last.min()).item(), torch.maximum(first.max(), last.max()).item()
    _, s, z = _omse_brute_force(last, lo, hi, UINT4)
    scale, zero_point = obs.qparams()
    assert scale.item() == pytest.approx(s, rel=1e-5) and zero_point.item() == z


def test_omse_without_scoring_fails_with_a_message():
    obs = OMSEObserver(UINT8)
    obs.observe(torch.randn(10))
    with pytest.raises(RuntimeError, match="never scored"):
        obs.qparams()


def _ptf_brute_force(x: torch.Tensor, lo: float, hi: float, bt: BitType) -> list[int]:
    s8 = (hi - lo) / (bt.qmax - bt.qmin)
    z = min(max(bt.qmin - round(lo / s8), bt.qmin), bt.qmax)
    alphas = []
    for c in range(x.shape[-1]):
        xc = x[..., c]
        errs = [_mse(xc, s8 / 8 * 2**a, z, bt) for a in range(4)]
        alphas.append(errs.index(min(errs)))
    return alphas


def test_ptf_gives_channels_of_very_different_ranges_different_power_of_two_factors():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 50, 3, generator=g) * 2 - 1  # [-1, 1)
    x = x * torch.tensor([0.05, 1.5, 8.0])  # tiny, medium and large channels
    q = FakeQuantizer(UINT8, "ptf", channels=3, dim=-1)
    q.fit(x)
    alphas = _ptf_brute_force(x, x.min().item(), x.max().item(), UINT8)
    assert alphas[0] == 0 and alphas[2] == 3  # the tiny channel gets the finest grid, the large one the widest
    base = (x.max() - x.min()).item() / 255 / 8
    assert torch.allclose(q.scale, torch.tensor([base * 2**a for a in alphas]), rtol=1e-5)
    assert torch.equal(q.zero_point, q.zero_point[0].expand(3))  # one zero point shared by every channel
    assert q.zero_point[0].item() == min(max(-round(x.min().item() / (base * 8)), 0), 255)


def test_ptf_factors_are_chosen_on_the_scored_batch_only():
    g = torch.Generator().manual_seed(5)
    first = (torch.rand(1, 40, 2, generator=g) * 2 - 1) * torch.tensor([8.0, 8.0])
    last = (torch.rand(1, 40, 2, generator=g) * 2 - 1) * torch.tensor([0.05, 8.0])
    obs = PTFObserver(UINT8, dim=-1)
    obs.observe(first)
    obs.observe(last)
    obs.score(last)
    scale, _ = obs.qparams()
    lo = torch.minimum(first.min(), last.min()).item()
    hi = torch.maximum(first.max(), last.max()).item()
    alphas = _ptf_brute_force(last, lo, hi, UINT8)
    assert alphas[0] < alphas[1]  # channel 0 was wide only in the first batch
    assert torch.allclose(scale, torch.tensor([(hi - lo) / 255 / 8 * 2**a for a in alphas]), rtol=1e-5)


def test_ptf_needs_a_channel_dimension():
    with pytest.raises(ValueError, match="per-channel"):
        PTFObserver(UINT8, dim=None)


def test_an_observer_that_saw_no_data_refuses_to_give_parameters():
    with pytest.raises(RuntimeError, match="saw no data"):
        MinMaxObserver(UINT8).qparams()
