"""Each quantization formula written once, run three ways with the same bits.

A formula here is a chain of tensor steps in PyTorch's in-place style: ``v.round_()`` reads "round v, which
nothing reads again". The formula's first argument, ``ops``, is the class that carries the values through the chain
and decides what a step does:

- :class:`Eager`: every step makes a new tensor, as the maths reads, and autograd sees it all (the rounding of fake
  quantization is straight-through). The reference: used with autograd and inside ``functional.reference_ops``.
- :class:`InPlace`: a step ending in ``_`` writes over its operand, and ``out=`` names the buffer a chain starts in,
  so a formula makes one or a few activation-sized buffers instead of one per step. The search's inference path.
- :class:`Traced`: out of place like ``Eager``, for ``torch.compile`` to fuse a whole chain into one loop
  (``fused.py`` compiles these formulas with it).

Rules a formula keeps so that the three agree: a ``_`` step is only applied to a value the formula made itself
(never to an input), and only where that value is not read again; a step without ``_`` (``div``, ``mul``, ``sign``,
``log2``) makes a new value. The bit tests (``tests/quant/test_formulas.py``, ``test_fast_paths.py``,
``test_fused.py``) compare the three on signed zeros, ties, tiny, huge and NaN inputs; what makes them equal is
noted at each formula.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny
V = TypeVar("V", bound="Eager")


# -- the formulas ---------------------------------------------------------------------------------------------------

def fake_quantize(ops: type[Eager], x: Tensor, scale: Tensor, zero_point: Tensor, qmin: float, qmax: float, *,
                  signed: bool, inplace: bool = False) -> Tensor:
    """x̂ = (clamp(round(x/s + z), qmin, qmax) - z)·s, ``scale``/``zero_point`` broadcastable against ``x``;
    round is half to even. ``signed`` says whether qmin < 0 (the traced kernels cannot branch on qmin's value).
    ``inplace``: x̂ is written over ``x``, a float32 temporary nobody reads again (on CPU a fresh buffer's first
    touch costs more than the arithmetic); backends that work out of place just return it.

    Where the backends differ to give the same bits:

    - x/s + z: in place it is ``addcdiv(z, x, s)``, which rounds the division first, then adds: the same two
      roundings in one pass instead of two.
    - round onto the grid (:meth:`Eager.onto_grid_`): ``Eager`` rounds with ``round_ste``, whose forward value
      v + (round(v) - v) is round(v) exactly except that it turns round's -0 (v in [-0.5, 0)) into +0, and whose
      gradient is torch's straight-through one (1 where round(v) is on the grid). In place, an unsigned grid clamps
      first (a negative v clamps to the bound, +0; the bounds are integers, so the order changes no value) and a
      signed one adds +0.0 after rounding (-0 + 0 = +0). Traced, the signed grid writes
      ``where(q == 0, 0.0, q)``: inductor folds an added 0.0 away.
    - An infinite x gives the grid's end in place where round_ste gives NaN; activations and weights never reach
      it (scales are >= float32 eps).
    """
    q = ops.div_add(x, scale, zero_point, out=x if inplace else None)
    q = q.onto_grid_(qmin, qmax, signed).sub_(zero_point).mul_(scale)
    return q.write_into(x) if inplace else q.t


def int_layer_norm(ops: type[Eager], x: Tensor, in_scale: Tensor, out_scale: Tensor, gamma: Tensor,
                   beta: Tensor) -> Tensor:
    """FQ-ViT's integer LayerNorm on a PTF grid (evolq-reference §1.5): channels aligned to the smallest scale by
    their power-of-two ratio, integer mean and std, then a dyadic affine m/2^n per element (eps is dropped).

    Two elementwise steps around two row sums. ``ops.step`` runs each step (one compiled kernel each with fused
    kernels on); the sums stay eager on every path: a reordered float32 sum changes the last bit.
    """
    s_min = in_scale.min()
    ratio = torch.round(in_scale / s_min)
    x_q, squares = ops.step(ln_align, x, in_scale, ratio)
    mean, std = int_norm_stats(x_q, squares, s_min)
    return ops.step(ln_affine, x_q, squares, s_min / std, mean / std, gamma, beta, out_scale)


def ln_align(ops: type[Eager], x: Tensor, in_scale: Tensor, ratio: Tensor) -> tuple[Tensor, Tensor]:
    """Integer LayerNorm, first step: the channel-aligned integers x_q = round(x / s_c)·(s_c / s_min) and their
    squares."""
    x_q = ops(x).div(in_scale).round_().mul_(ratio)
    return x_q.t, x_q.mul(x_q).t


def int_norm_stats(x_q: Tensor, squares: Tensor, s_min: Tensor) -> tuple[Tensor, Tensor]:
    """Integer LayerNorm's statistics: mean and std per row from the sums of the aligned integers and of their
    squares (float32 sums, eager on every path)."""
    channels = x_q.shape[-1]
    total = x_q.sum(dim=-1, keepdim=True)
    mean = total / channels * s_min
    var_int = (channels * squares.sum(dim=-1, keepdim=True) - total.pow(2)).clamp(min=0)
    std = (s_min / channels) * torch.sqrt(var_int)
    return mean, std.clamp(min=TINY)


def ln_affine(ops: type[Eager], x_q: Tensor, work: Tensor, s_over_std: Tensor, mean_over_std: Tensor,
              gamma: Tensor, beta: Tensor, out_scale: Tensor) -> Tensor:
    """Integer LayerNorm, last step: per element the gain a = (s_min/σ)·γ / s_out as sign·m/2^n with
    n = clamp(7 - floor(log2 |a|), 0, 31) and m = clamp(floor(|a|·2^n), 0, 255), the bias
    b = round((β - μ/σ·γ) / s_out · 2^n), then y = round((sign·m·x_q + b) / 2^n)·s_out. ``work`` (the squares,
    read by nothing after the sums) holds a, |a|, m and then y.

    Equal bits: 7 - t is computed as -t + 7, β - c as -c + β and sign·m as m·sign, which IEEE 754 defines alike;
    2^n is computed once (:meth:`Eager.pow2_`: pow in the reference, exp2 in place where it is exact on all 32
    exponents, exp2 traced, where fused.py checks each kernel against the in-place path on its first call).
    """
    a = ops(s_over_std).mul(gamma, out=work).div_(out_scale)
    sign = a.sign()
    a_abs = a.abs_().clamp_(TINY)
    pow_n = a_abs.log2().floor_().neg_().add_(7).clamp_(0, 31).pow2_()
    m = a_abs.mul_(pow_n).floor_().clamp_(0, 255)
    b = ops(mean_over_std).mul(gamma).neg_().add_(beta).div_(out_scale).mul_(pow_n).round_()
    y = m.mul_(sign).mul_(x_q).add_(b).div_(pow_n).round_().mul_(out_scale)
    return y.write_into(work)


def ptf_scale(base: Tensor, alpha: Tensor | int) -> Tensor:
    """PTF's per-channel scale (s8/8)·2^α (evolq-reference §1.4): a power-of-two multiple, exact in float."""
    return base * 2.0**alpha


# -- the three backends ---------------------------------------------------------------------------------------------

def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def straight_through(exact: Tensor, surrogate: Tensor) -> Tensor:
    """``exact``'s value with ``surrogate``'s gradient: for integer steps whose own gradient is zero almost
    everywhere (integer LayerNorm, log-int softmax, a log2 grid), the float op they approximate passes one back.
    The value is ``exact`` + 0, so only a -0 can turn into +0."""
    return exact.detach() + (surrogate - surrogate.detach())


_exp2_exact: dict[tuple[str, torch.dtype], bool] = {}


def pow2_int(n: Tensor, out: Tensor | None = None) -> Tensor:
    """2**n for integer-valued n in [0, 31]: exp2, ten times cheaper than pow(2.0, n) on CPU, wherever it gives
    the same bits on all 32 exponents (checked once per device type and dtype), else pow itself."""
    key = (n.device.type, n.dtype)
    exact = _exp2_exact.get(key)
    if exact is None:
        k = torch.arange(32, dtype=n.dtype, device=n.device).repeat(5)[:157]  # vector body and scalar tail
        exact = _exp2_exact[key] = bool(torch.equal(torch.exp2(k), torch.pow(2.0, k)))
    return torch.exp2(n, out=out) if exact else torch.pow(2.0, n, out=out)


def _raw(v: Any) -> Any:
    return v.t if isinstance(v, Eager) else v


class Eager:
    """A value in a formula; every step makes a new tensor (see the module docstring)."""

    def __init__(self, t: Tensor) -> None:
        self.t = t

    @classmethod
    def step(cls, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
        """Run one elementwise formula on this backend (fused.Fused runs it as a compiled kernel instead)."""
        return fn(cls, *args, **static)

    @classmethod
    def div_add(cls: type[V], x: Tensor, s: Tensor, z: Tensor, out: Tensor | None = None) -> V:
        """x/s + z, the division rounded first; ``out``: where an in-place backend may write it."""
        return cls(x / s + z)

    def _new(self: V, t: Tensor) -> V:
        return type(self)(t)

    # steps that make a new value
    def mul(self: V, other: Any, out: Tensor | None = None) -> V:
        return self._new(torch.mul(self.t, _raw(other)))

    def div(self: V, other: Any, out: Tensor | None = None) -> V:
        return self._new(torch.div(self.t, _raw(other)))

    def sign(self: V) -> V:
        return self._new(torch.sign(self.t))

    def log2(self: V) -> V:
        return self._new(torch.log2(self.t))

    # steps that may write over this value
    def add_(self: V, other: Any) -> V:
        return self._new(torch.add(self.t, _raw(other)))

    def sub_(self: V, other: Any) -> V:
        return self._new(torch.sub(self.t, _raw(other)))

    def mul_(self: V, other: Any) -> V:
        return self._new(torch.mul(self.t, _raw(other)))

    def div_(self: V, other: Any) -> V:
        return self._new(torch.div(self.t, _raw(other)))

    def neg_(self: V) -> V:
        return self._new(torch.neg(self.t))

    def abs_(self: V) -> V:
        return self._new(torch.abs(self.t))

    def round_(self: V) -> V:
        return self._new(torch.round(self.t))

    def floor_(self: V) -> V:
        return self._new(torch.floor(self.t))

    def clamp_(self: V, lo: float, hi: float | None = None) -> V:
        return self._new(torch.clamp(self.t, lo, hi))

    def onto_grid_(self: V, qmin: float, qmax: float, signed: bool) -> V:
        """clamp(round(v), qmin, qmax), round half to even, never -0 (see :func:`fake_quantize`)."""
        return self._new(torch.clamp(round_ste(self.t), qmin, qmax))

    def pow2_(self: V) -> V:
        """2**n for the integer-valued n in [0, 31] this value holds."""
        return self._new(torch.pow(2.0, self.t))

    def write_into(self, dst: Tensor) -> Tensor:
        """The result, in ``dst`` on backends that work in given buffers (here: returned as it is)."""
        return self.t


class InPlace(Eager):
    """Steps ending in ``_`` write over their value; ``out=`` is honoured. Inference only (no autograd)."""

    @classmethod
    def div_add(cls: type[V], x: Tensor, s: Tensor, z: Tensor, out: Tensor | None = None) -> V:
        return cls(torch.addcdiv(z, x, s, out=out))

    def mul(self: V, other: Any, out: Tensor | None = None) -> V:
        return self._new(torch.mul(self.t, _raw(other), out=out))

    def div(self: V, other: Any, out: Tensor | None = None) -> V:
        return self._new(torch.div(self.t, _raw(other), out=out))

    def add_(self: V, other: Any) -> V:
        self.t.add_(_raw(other))
        return self

    def sub_(self: V, other: Any) -> V:
        self.t.sub_(_raw(other))
        return self

    def mul_(self: V, other: Any) -> V:
        self.t.mul_(_raw(other))
        return self

    def div_(self: V, other: Any) -> V:
        self.t.div_(_raw(other))
        return self

    def neg_(self: V) -> V:
        self.t.neg_()
        return self

    def abs_(self: V) -> V:
        self.t.abs_()
        return self

    def round_(self: V) -> V:
        self.t.round_()
        return self

    def floor_(self: V) -> V:
        self.t.floor_()
        return self

    def clamp_(self: V, lo: float, hi: float | None = None) -> V:
        self.t.clamp_(lo, hi)
        return self

    def onto_grid_(self: V, qmin: float, qmax: float, signed: bool) -> V:
        if signed:
            self.t.round_().add_(0.0).clamp_(qmin, qmax)
        else:
            self.t.clamp_(qmin, qmax).round_()
        return self

    def pow2_(self: V) -> V:
        pow2_int(self.t, out=self.t)
        return self

    def write_into(self, dst: Tensor) -> Tensor:
        return self.t if self.t is dst else dst.copy_(self.t)


class Traced(Eager):
    """Out of place, for ``torch.compile`` (inductor fuses the chain and keeps eager's division and rounding with
    the options fused.py gives it); writing into a given buffer is part of the compiled loop."""

    def onto_grid_(self: V, qmin: float, qmax: float, signed: bool) -> V:
        if signed:
            q = torch.round(self.t)
            return self._new(torch.clamp(torch.where(q == 0, 0.0, q), qmin, qmax))
        return self._new(torch.clamp(self.t, qmin, qmax).round())

    def pow2_(self: V) -> V:
        return self._new(torch.exp2(self.t))

    def write_into(self, dst: Tensor) -> Tensor:
        return dst.copy_(self.t)
