"""Quantization math of evolq_pl.quant.functional against hand-computed cases and torch's own fake quantizers."""

import threading

import pytest
import torch

from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType

UINT2, UINT4, UINT8 = BitType(2, False), BitType(4, False), BitType(8, False)
INT4 = BitType(4, True)


def test_fake_quantize_per_tensor_rounds_half_to_even_shifts_by_zero_point_and_clamps():
    # uint8, s = 0.5, z = 10: x/s + z = 10.5, 11.5, 0, -2, 254, 410
    x = torch.tensor([0.25, 0.75, -5.0, -6.0, 122.0, 200.0])
    out = F.fake_quantize(x, torch.tensor([0.5]), torch.tensor([10.0]), UINT8)
    # 10.5 -> 10 and 11.5 -> 12 (half to even); -2 clamps to 0 and 410 to 255
    assert torch.equal(out, torch.tensor([0.0, 1.0, -5.0, -5.0, 122.0, 122.5]))


def test_fake_quantize_signed_grid_is_asymmetric_around_zero():
    # int4 is [-8, 7]: with s = 0.25 the representable range is [-2.0, 1.75]
    x = torch.tensor([0.125, 0.375, -2.0, -3.0, 1.75, 2.0])
    out = F.fake_quantize(x, torch.tensor([0.25]), torch.tensor([0.0]), INT4)
    assert torch.equal(out, torch.tensor([0.0, 0.5, -2.0, -2.0, 1.75, 1.75]))


def test_fake_quantize_per_channel_uses_each_rows_scale_and_zero_point():
    x = torch.tensor([[0.125, 0.375, 5.0], [-1.0, 0.0625, 0.1875]])
    scale, zero_point = torch.tensor([0.25, 0.125]), torch.tensor([0.0, 2.0])
    out = F.fake_quantize(x, scale, zero_point, UINT2, dim=0)
    # row 0: 0.5 -> 0, 1.5 -> 2, 20 -> 3 (clamp); row 1: -8+2 -> 0, 0.5+2 -> 2, 1.5+2 = 3.5 -> 4 -> 3
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.75], [-0.25, 0.0, 0.125]]))


def _grid_data(shape, generator):
    """Values on a 1/64 grid, so that with power-of-two scales every x/s is exact and ties really occur."""
    return torch.randint(-600, 600, shape, generator=generator).float() / 64


def test_fake_quantize_matches_torch_per_tensor_including_ties():
    g = torch.Generator().manual_seed(0)
    x = _grid_data((4, 7, 16), g)
    # even zero points: there round(x/s + z) and torch's round(x/s) + z agree even at ties
    for scale, zp in [(0.5, 4), (0.125, 128), (2.0, 0), (0.25, 254)]:
        ours = F.fake_quantize(x, torch.tensor([scale]), torch.tensor([float(zp)]), UINT8)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
        assert torch.equal(ours, ref)
    ties = (x / 0.5 - torch.floor(x / 0.5)) == 0.5
    assert ties.any()  # the comparison above covered round-half-to-even


def test_fake_quantize_rounds_after_adding_the_zero_point_as_the_reference():
    # x/s = 5.5: the reference rounds 5.5 + 3 = 8.5 to 8; torch rounds 5.5 to 6 and then adds 3
    x = torch.tensor([2.75])
    ours = F.fake_quantize(x, torch.tensor([0.5]), torch.tensor([3.0]), UINT8)
    assert ours.item() == 2.5
    assert torch.fake_quantize_per_tensor_affine(x, 0.5, 3, 0, 255).item() == 3.0


def test_fake_quantize_matches_torch_per_channel_on_rows_and_last_dim():
    g = torch.Generator().manual_seed(1)
    w = _grid_data((6, 10), g)
    scale = 2.0 ** -torch.randint(0, 5, (6,), generator=g).float()
    zp = 2 * torch.randint(0, 8, (6,), generator=g)
    ours = F.fake_quantize(w, scale, zp.float(), UINT4, dim=0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, 0, 15)
    assert torch.equal(ours, ref)

    act = _grid_data((2, 5, 6), g)  # activations: channels on the last dim
    ours = F.fake_quantize(act, scale, zp.float(), UINT4, dim=-1)
    ref = torch.fake_quantize_per_channel_affine(act, scale, zp.int(), 2, 0, 15)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, F.fake_quantize(act, scale.flip(0), zp.float(), UINT4, dim=-1))


def test_straight_through_gradient_is_identity_inside_the_range_and_zero_where_clamped():
    x = torch.tensor([-3.0, -0.3, 0.0, 0.37, 0.9, 9.0], requires_grad=True)
    F.fake_quantize(x, torch.tensor([0.1]), torch.tensor([5.0]), UINT4).sum().backward()
    # the grid covers [-0.5, 1.0]: -3 and 9 clamp
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))

    x_ref = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x_ref, 0.1, 5, 0, 15).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_round_ste_forward_rounds_half_to_even_backward_is_identity():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], requires_grad=True)
    y = F.round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, 0.0]))
    (y * torch.arange(6.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(6.0))


def test_qparams_from_minmax_unsigned_and_signed():
    s, z = F.qparams_from_minmax(torch.tensor([-1.0]), torch.tensor([3.0]), UINT8)
    assert torch.allclose(s, torch.tensor([4.0 / 255]))
    assert z.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    s, z = F.qparams_from_minmax(torch.tensor([-1.0]), torch.tensor([3.0]), BitType(8, True))
    assert torch.allclose(s, torch.tensor([3.0 / 127.5]))
    assert z.item() == 0


def test_qparams_scale_never_below_float_eps_for_a_constant_tensor():
    s, _ = F.qparams_from_minmax(torch.tensor([0.5]), torch.tensor([0.5]), UINT8)
    assert s.item() == torch.finfo(torch.float32).eps
    out = F.fake_quantize(torch.full((3,), 0.5), s, torch.zeros(1), UINT8)
    assert torch.isfinite(out).all()


def test_omse_candidates_are_90_shrink_ratios_from_one_down_by_one_percent():
    ratios = F.omse_candidates()
    assert len(ratios) == 90
    assert ratios[0] == 1.0
    assert abs(ratios[1] - 0.99) < 1e-12 and abs(ratios[-1] - 0.11) < 1e-12


def test_log2_quantize_rounds_in_the_log_domain_and_zeroes_below_the_grid():
    x = torch.tensor([1.0, 0.5, 0.3, 0.7, 2.0**-15, 2.0**-16, 0.0])
    out = F.log2_quantize(x, bits=4)
    # -log2: 0, 1, 1.74 -> 2, 0.51 -> 1, 15, 16 (>= 2^4: zero), inf (zero)
    assert torch.equal(out, torch.tensor([1.0, 0.5, 0.25, 0.5, 2.0**-15, 0.0, 0.0]))


def _is_power_of_two_or_zero(t: torch.Tensor) -> bool:
    nonzero = t[t != 0]
    return bool((nonzero > 0).all() and torch.equal(torch.log2(nonzero), torch.round(torch.log2(nonzero))))


def test_log2_quantize_of_a_softmax_gives_powers_of_two_or_zero():
    p = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(2)).mul(3).softmax(-1)
    out = F.log2_quantize(p, bits=4)
    assert _is_power_of_two_or_zero(out)
    assert out.max() <= 1.0


def test_log_int_softmax_gives_powers_of_two_close_to_a_peaked_softmax():
    g = torch.Generator().manual_seed(3)
    scale = 0.05
    scores = torch.randn(2, 3, 6, 6, generator=g)
    scores[..., 0] += 6.0  # one dominant key per row: peaked softmax
    scores = torch.round(scores / scale) * scale  # scores as the pre-softmax quantizer delivers them
    out = F.log_int_softmax(scores, scale, bits=4)
    ref = scores.softmax(-1)
    assert _is_power_of_two_or_zero(out)
    row_sums = out.sum(-1)
    assert ((row_sums > 0.75) & (row_sums < 1.25)).all(), row_sums
    # every non-negligible probability lands on a neighbouring power of two: log-domain rounding is within 4/3,
    # the integer exp (ln 2 rounded to a whole number of input steps) adds a few percent per halving
    big = ref > 0.01
    ratio = out[big] / ref[big]
    assert ((ratio > 0.5) & (ratio < 2.0)).all()
    assert torch.equal(out[..., 0], torch.ones_like(out[..., 0]))  # the dominant key gets 2^0


def test_log_int_softmax_is_invariant_to_a_constant_shift_of_the_scores():
    scale = 0.1
    scores = torch.round(torch.randn(4, 5, generator=torch.Generator().manual_seed(4)) / scale) * scale
    a = F.log_int_softmax(scores, scale, bits=4)
    b = F.log_int_softmax(scores + 20 * scale, scale, bits=4)
    assert torch.equal(a, b)


def test_bias_correct_matches_row_mean_and_unbiased_std_of_the_float_weight():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 3, 2, 2, generator=g) * torch.tensor([0.01, 0.1, 1.0, 0.5, 2.0]).view(5, 1, 1, 1)
    s, z = F.qparams_from_minmax(*F.channel_minmax(w, 0), UINT4)
    w_hat = F.fake_quantize(w, s, z, UINT4, dim=0)
    out = F.bias_correct(w_hat, w)
    rows, rows_out = w.reshape(5, -1), out.reshape(5, -1)
    assert torch.allclose(rows_out.mean(1), rows.mean(1), atol=1e-6)
    assert torch.allclose(rows_out.std(1), rows.std(1), rtol=1e-5)
    assert not torch.allclose(w_hat.reshape(5, -1).std(1), rows.std(1), rtol=1e-3)  # there was something to fix


@pytest.mark.parametrize("dim", [None, -1])
def test_omse_and_ptf_score_the_bits_the_quantizer_gives(dim):
    bt = UINT4
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 20, 8, generator=g) * 2
    scale = torch.rand(1 if dim is None else 8, generator=g) * 0.2 + 0.05
    zp = torch.randint(0, 16, scale.shape, generator=g).float()
    with torch.no_grad():
        expected = (F.fake_quantize(x, scale, zp, bt, dim) - x).square().mean()
        assert torch.equal(F.quant_mse(x, scale, zp, bt, dim), expected)
    base, z = F.ptf_candidates(x.min(), x.max(), bt)
    errors = F.ptf_channel_errors(x, base, z, bt, dim=-1)
    for alpha in range(4):
        x_hat = F.fake_quantize(x, base * 2**alpha, z, bt)
        assert torch.equal(errors[alpha], (x_hat - x).square().reshape(-1, 8).sum(dim=0))


def test_reference_ops_restores_the_previous_choice_also_when_the_body_raises():
    assert F.fast_paths_enabled()
    with pytest.raises(KeyError), F.reference_ops():
        assert not F.fast_paths_enabled()
        with F.reference_ops():
            assert not F.fast_paths_enabled()
        assert not F.fast_paths_enabled()
        raise KeyError("the body fails")
    assert F.fast_paths_enabled()


def test_reference_ops_in_one_thread_leaves_other_threads_on_the_fast_path():
    seen = []
    with F.reference_ops():
        worker = threading.Thread(target=lambda: seen.append(F.fast_paths_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]
