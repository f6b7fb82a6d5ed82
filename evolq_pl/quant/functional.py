"""Pure quantization math: tensors in, tensors out, no state.

Formulas follow evolq-reference §1.4-1.6; modules in this package call these and never redo the math. Fake
quantization, PTF's scales and integer LayerNorm are written once in ``formulas.py``; this module picks the backend
that runs them (out of place with autograd, in place for inference, compiled with fused kernels on).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from evolq_pl.quant import formulas, fused
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.formulas import pow2_int as pow2_int
from evolq_pl.quant.formulas import round_ste as round_ste
from evolq_pl.quant.formulas import straight_through as straight_through

EPS = torch.finfo(torch.float32).eps
_FAST_PATHS: ContextVar[bool] = ContextVar("evolq_fast_paths", default=True)


@contextmanager
def reference_ops() -> Iterator[None]:
    """Compute with the plain out-of-place formulas even without autograd (tests and the speed benchmark compare
    them with the in-place inference path). The previous choice is restored on exit, also when the block raises;
    the choice is the calling thread's (a ContextVar, as torch's grad mode)."""
    previous = _FAST_PATHS.get()
    _FAST_PATHS.set(False)
    try:
        yield
    finally:
        _FAST_PATHS.set(previous)


def fast_paths_enabled() -> bool:
    """False inside ``reference_ops``: layers then also skip their inference-only caches."""
    return _FAST_PATHS.get()


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def inplace_ok(*tensors: torch.Tensor) -> bool:
    """Whether a result may be built in place in one buffer: the search scores candidates without autograd, and
    each avoided temporary is a full pass over an activation (the elementwise passes dominate a candidate)."""
    return _FAST_PATHS.get() and not needs_grad(*tensors)


def fast_ops() -> type[formulas.Eager]:
    """The backend of the inference path: in place, or compiled kernels inside ``fused.fused_kernels``."""
    return fused.Fused if fused.fused_enabled() else formulas.InPlace


def broadcast_shape(x: torch.Tensor, dim: int | None) -> list[int]:
    """Shape that makes a per-channel vector broadcast along ``dim`` of ``x`` (None: per tensor)."""
    shape = [1] * x.dim()
    if dim is not None:
        shape[dim] = x.shape[dim]
    return shape


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bt: BitType, dim: int | None = None
) -> torch.Tensor:
    """x̂ = (clamp(round(x/s + z), qmin, qmax) - z)·s (``formulas.fake_quantize``), with ``scale``/``zero_point``
    per channel along ``dim``: in place in one buffer without autograd, else out of place with a straight-through
    round."""
    if dim is not None:
        shape = broadcast_shape(x, dim)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    ops = fast_ops() if inplace_ok(x, scale, zero_point) else formulas.Eager
    return ops.step(formulas.fake_quantize, x, scale, zero_point, bt.qmin, bt.qmax, signed=bt.signed)


def fake_quantize_(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bt: BitType, dim: int | None = None
) -> torch.Tensor:
    """fake_quantize written over ``x``, for a temporary nobody reads again: no new activation-sized buffer,
    whose first touch (page faults) costs more than the arithmetic on CPU. Falls back to fake_quantize where
    writing into ``x`` is impossible or autograd needs it."""
    if not (inplace_ok(x, scale, zero_point) and x.is_contiguous()
            and x.dtype == scale.dtype == zero_point.dtype == torch.float32):
        return fake_quantize(x, scale, zero_point, bt, dim)
    if dim is not None:
        shape = broadcast_shape(x, dim)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return fast_ops().step(formulas.fake_quantize, x, scale, zero_point, bt.qmin, bt.qmax, signed=bt.signed,
                           inplace=True)


def squared_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bt: BitType) -> torch.Tensor:
    """(x̂ - x)² per element, x̂ by the quantizer's own formula, in one new buffer (``x`` float32, no autograd):
    what OMSE and PTF score their candidate grids with."""
    x_hat = formulas.fake_quantize(formulas.InPlace, x, scale, zero_point, bt.qmin, bt.qmax, signed=bt.signed)
    return x_hat.sub_(x).square_()


def channel_minmax(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per channel along ``dim`` (reducing every other dim), or over the whole tensor."""
    if dim is None:
        return x.min().reshape(1), x.max().reshape(1)
    flat = x.detach().movedim(dim, 0).reshape(x.shape[dim], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def qparams_from_minmax(
    min_val: torch.Tensor, max_val: torch.Tensor, bt: BitType, symmetric: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) from a range; signed types are symmetric unless told otherwise (§1.4 minmax)."""
    symmetric = bt.signed if symmetric is None else symmetric
    if symmetric:
        scale = torch.maximum(-min_val, max_val) / (bt.levels / 2)
        scale = scale.clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    scale = ((max_val - min_val) / bt.levels).clamp(min=EPS)
    zero_point = torch.clamp(bt.qmin - torch.round(min_val / scale), bt.qmin, bt.qmax)
    return scale, zero_point


def omse_candidates(num: int = 90, step: float = 0.01) -> list[float]:
    """Shrink ratios of the OMSE grid: 1, 0.99, ..., 0.11 for the default 90 steps."""
    return [1.0 - step * i for i in range(num)]


def quant_mse(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bt: BitType, dim: int | None) -> torch.Tensor:
    """Mean squared error of fake-quantizing ``x`` (over every element); one buffer, since OMSE calls it 90 times
    per tensor."""
    if dim is not None:
        shape = broadcast_shape(x, dim)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return squared_error(x, scale, zero_point, bt).mean()


def ptf_candidates(
    min_all: torch.Tensor, max_all: torch.Tensor, bt: BitType
) -> tuple[torch.Tensor, torch.Tensor]:
    """PTF base scale s8/8 and the zero point shared by every channel: the asymmetric min-max grid of the whole
    range, s8, refined eightfold (§1.4 PTF)."""
    scale8, zero_point = qparams_from_minmax(min_all, max_all, bt, symmetric=False)
    return scale8 / 8, zero_point


PTF_ALPHAS = 4  # α = 0..3


def ptf_channel_errors(
    x: torch.Tensor, base_scale: torch.Tensor, zero_point: torch.Tensor, bt: BitType, dim: int
) -> torch.Tensor:
    """Squared-error sums [4, C] of each channel of ``x`` fake-quantized at scale base·2^α, α = 0..3."""
    xc = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim])
    return torch.stack([squared_error(xc, formulas.ptf_scale(base_scale, alpha), zero_point, bt).sum(dim=0)
                        for alpha in range(PTF_ALPHAS)])


def log2_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Log2 quantizer for values in [0, 1]: q = round(-log2 x) on [0, 2^b - 1], x̂ = 2^-q, 0 below the grid."""
    q = torch.round(-torch.log2(x.clamp(min=1e-30)))
    mask = q >= 2**bits
    out = torch.pow(2.0, -torch.clamp(q, 0, 2**bits - 1))
    return out.masked_fill(mask, 0.0)


def _int_exp(x_int: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """I-BERT integer exp of x_int·scale (x_int <= 0): 2nd-order polynomial on the ln2-reduced range."""
    coef = (0.35815147, 0.96963238 / 0.35815147, 1.0 / 0.35815147)
    n = 30
    x0_int = math.floor(-0.6931 / scale)
    x_int = torch.maximum(x_int, torch.full_like(x_int, n * x0_int))
    q = torch.floor(x_int / x0_int)
    r = x_int - x0_int * q
    b_int = math.floor(coef[1] / scale)
    c_int = math.floor(coef[2] / scale**2)
    poly = r * (r + b_int) + c_int
    exp_int = torch.clamp(torch.floor(poly * torch.pow(2.0, n - q)), min=0)
    return exp_int, coef[0] * scale**2 / 2**n


def log_int_softmax(x: torch.Tensor, scale: float, bits: int = 4) -> torch.Tensor:
    """FQ-ViT's log-int-softmax (§1.6): integer exp, then a log2 grid with round-half-up in the log domain."""
    x_int = torch.round(x / scale)
    x_int = x_int - x_int.amax(dim=-1, keepdim=True)
    exp_int, _ = _int_exp(x_int, scale)
    ratio = torch.round(exp_int.sum(dim=-1, keepdim=True) / exp_int.clamp(min=1))
    ratio = ratio.clamp(min=1)
    floor_log = torch.floor(torch.log2(ratio))
    big = torch.pow(2.0, floor_log)
    k = floor_log + ((ratio - big) >= big / 2).to(ratio.dtype)
    out = torch.pow(2.0, -torch.clamp(k, 0, 2**bits - 1))
    return out.masked_fill((k >= 2**bits) | (exp_int == 0), 0.0)


def bias_correct(w_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row re-matching of mean and (unbiased) std of the dequantized weight to the FP weight (§1.7)."""
    rows_hat = w_hat.reshape(w_hat.shape[0], -1)
    rows = w.reshape(w.shape[0], -1)
    mean_hat, std_hat = rows_hat.mean(dim=1, keepdim=True), rows_hat.std(dim=1, keepdim=True)
    mean, std = rows.mean(dim=1, keepdim=True), rows.std(dim=1, keepdim=True)
    out = (rows_hat - mean_hat) * (std / (std_hat + 1e-8)) + mean
    return out.reshape(w_hat.shape)
