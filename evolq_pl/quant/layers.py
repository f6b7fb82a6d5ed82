"""Quantized layers that take over a float layer's parameters (shared, not copied)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as TF
from torch import nn

from evolq_pl.quant import formulas
from evolq_pl.quant import functional as F
from evolq_pl.quant.bit_types import BitType
from evolq_pl.quant.quantizer import FakeQuantizer, Log2Quantizer

_WEIGHT_CACHE: ContextVar[bool] = ContextVar("evolq_weight_cache", default=True)


@contextmanager
def weight_cache_disabled() -> Iterator[None]:
    """Re-quantize every weight on every forward, as the original code does (the benchmark's naive baseline). The
    previous choice is restored on exit, also when the block raises; the choice is the calling thread's."""
    previous = _WEIGHT_CACHE.get()
    _WEIGHT_CACHE.set(False)
    try:
        yield
    finally:
        _WEIGHT_CACHE.set(previous)


class _QWeight:
    """Mixin: per-output-channel weight quantizer, optional bias correction, cached fake-quantized weight.

    The cache is keyed on the version counters of the weight and of the quantizer's buffers, so a search that
    writes new scales (or a checkpoint load) invalidates exactly the layers it touched.
    """

    weight: nn.Parameter
    weight_quantizer: FakeQuantizer
    bias_correction: bool

    def _init_quant(self, bit_type: BitType, observer: str, bias_correction: bool) -> None:
        self.weight_quantizer = FakeQuantizer(bit_type, observer, channels=self.weight.shape[0], dim=0)
        self.bias_correction = bias_correction
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._cast: tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor | None] | None = None

    def calibrate_weight(self) -> None:
        self.weight_quantizer.fit(self.weight.detach())

    def _cache_key(self) -> tuple:
        q = self.weight_quantizer
        return (self.weight._version, self.weight.data_ptr(), q.scale._version, q.scale.data_ptr(),
                q.zero_point._version, self.bias_correction, self.weight.device)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: fake-quantized (and bias-corrected) when its quantizer is on."""
        q = self.weight_quantizer
        if not q.enabled:
            return self.weight
        cached = _WEIGHT_CACHE.get()
        key = self._cache_key() if cached else None
        if cached and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.inference_mode(False), torch.no_grad():
            w_hat = self.weight_for_scale(q.scale).to(self.weight.dtype)
        if cached:
            self._cache = (key, w_hat)
        return w_hat

    def weight_for_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The float32 weight the layer would compute with under per-channel ``scale`` (its own zero points and
        bias correction), without writing ``scale``: how a search weighs a candidate layer by layer. Differentiable
        in ``scale`` where autograd is on (the rounding is straight-through)."""
        q = self.weight_quantizer
        w = self.weight.detach().float()
        w_hat = F.fake_quantize(w, scale.to(w.device, torch.float32).reshape(q.scale.shape), q.zero_point,
                                q.bit_type, dim=0)
        return F.bias_correct(w_hat, w) if self.bias_correction else w_hat

    def compute_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias for an input ``x``, in the dtype the op computes in.

        Under autocast (bf16-mixed) the op would cast the cached weight on every call, a pass over every weight
        per batch; the cast is cached next to the fake-quantized weight instead (the same cast, the same bits).
        """
        w, bias = self.quantized_weight(), self.bias
        floating = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        autocast = floating and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if w.dtype == dtype:
            return w, bias
        if not (_WEIGHT_CACHE.get() and F.fast_paths_enabled()):
            return (w, bias) if autocast else (w.to(dtype), bias)
        key = (dtype, autocast, w._version, None if bias is None else (bias._version, bias.data_ptr()))
        if self._cast is None or self._cast[0] is not w or self._cast[1] != key:
            with torch.inference_mode(False), torch.no_grad():
                b = bias.detach().to(dtype) if autocast and bias is not None else bias
                self._cast = (w, key, w.detach().to(dtype), b)
        return self._cast[2], self._cast[3]


class QLinear(_QWeight, nn.Linear):
    """nn.Linear whose weight is fake-quantized per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bit_type: BitType,
                 observer: str = "minmax", bias_correction: bool = False, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(bit_type, observer, bias_correction)

    @classmethod
    def from_float(cls, linear: nn.Linear, bit_type: BitType, observer: str = "minmax",
                   bias_correction: bool = False) -> QLinear:
        q = cls.__new__(cls)
        nn.Linear.__init__(q, linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._init_quant(bit_type, observer, bias_correction)
        q.weight_quantizer.to(linear.weight.device)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(x, *self.compute_params(x))


class QConv2d(_QWeight, nn.Conv2d):
    """nn.Conv2d whose weight is fake-quantized per output channel."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bit_type: BitType, observer: str = "minmax",
                   bias_correction: bool = False) -> QConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._init_quant(bit_type, observer, bias_correction)
        q.weight_quantizer.to(conv.weight.device)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self.compute_params(x))


class QIntLayerNorm(nn.LayerNorm):
    """LayerNorm with FQ-ViT's integer mode on a PTF-quantized input (evolq-reference §1.5).

    ``use_int`` is the configured choice; ``int_mode`` is whether it is active now (set by the mode helpers).
    The integer path needs the input quantizer (per-channel PTF scales) and the output quantizer (per tensor).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, use_int: bool = True, device=None) -> None:
        super().__init__(normalized_shape, eps=eps, device=device)
        self.use_int = use_int
        self.int_mode = False

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, use_int: bool = True) -> QIntLayerNorm:
        q = cls(ln.normalized_shape[0], ln.eps, use_int, device="meta")
        q.weight, q.bias = ln.weight, ln.bias
        return q

    def forward(self, x: torch.Tensor, in_q: FakeQuantizer | None = None,
                out_q: FakeQuantizer | None = None) -> torch.Tensor:
        if not (self.int_mode and in_q is not None and out_q is not None):
            return TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        y = int_layer_norm(x.float(), in_q.scale, out_q.scale, self.weight.float(), self.bias.float())
        if F.needs_grad(x):  # the integer statistics pass no gradient; the float LayerNorm's stands in
            return F.straight_through(y, TF.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                                       self.bias.float(), self.eps))
        return y


def int_layer_norm(x: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor,
                   gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Integer LayerNorm (``formulas.int_layer_norm``): power-of-two channel alignment, integer statistics, dyadic
    affine (eps dropped); in five buffers without autograd (the formula out of place makes ~30 tensors)."""
    ops = F.fast_ops() if F.inplace_ok(x, in_scale, out_scale, gamma, beta) else formulas.Eager
    return formulas.int_layer_norm(ops, x, in_scale, out_scale, gamma, beta)


class QSoftmax(nn.Module):
    """Softmax whose output is quantized: FP softmax then a uniform quantizer (the e2e default), a log2 grid,
    or FQ-ViT's log-int-softmax (LIS), which needs the pre-softmax quantizer's scale."""

    def __init__(self, mode: str, bits: int, observer: str = "minmax") -> None:
        super().__init__()
        if mode not in ("uniform", "log2", "lis"):
            raise ValueError(f"unknown softmax quantization {mode!r}: choose uniform, log2 or lis")
        self.mode = mode
        if mode == "uniform":  # its input is always this module's own softmax output
            self.quantizer: nn.Module = FakeQuantizer(BitType(bits, False), observer, reuse_input=True)
        else:
            self.quantizer = Log2Quantizer(bits)

    def forward(self, x: torch.Tensor, in_q: FakeQuantizer | None = None) -> torch.Tensor:
        lis_on = self.mode == "lis" and self.quantizer.enabled and in_q is not None and in_q.enabled
        if lis_on:
            y = F.log_int_softmax(x.float(), float(in_q.scale), self.quantizer.bit_type.bits)
            return F.straight_through(y, x.float().softmax(dim=-1)) if F.needs_grad(x) else y
        return self.quantizer(x.float().softmax(dim=-1))

