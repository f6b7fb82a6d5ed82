"""Fused kernels for the inference path: each fake-quantizer and each integer LayerNorm in one pass.

A candidate evaluation is dominated by elementwise passes over activation-sized tensors: a fake-quantizer is five
of them, an integer LayerNorm about twenty. ``torch.compile`` (inductor) fuses each chain into one loop. Only
operations that IEEE 754 rounds exactly are fused (add, mul, true division, round, floor, clamp, sign, log2 and
exp2 on the values they see here), with inductor told to keep divisions as divisions and to round as eager does;
the two LayerNorm reductions stay eager, since a reordered sum changes the last bit. The fused results are bitwise
equal to the eager path (``tests/quant/test_fused.py``), so turning this on changes speed, never a search. The
promise is also kept at run time: the first call of each kernel variant (rank, dtype, device, broadcast pattern,
layout) runs the same formula on the default in-place path beside it and stops with an error where a bit differs.
A compiler bug, Triton's log2/exp2 on a GPU, or a cache directory shared with processes of another vector ISA (an
AVX2 process was seen to get kernels an AVX-512 one had cached, which left half their output unwritten) then fails
loudly instead of steering a search.

The kernels are not written here: each is a formula of ``formulas.py`` run on its ``Traced`` backend, the one
definition that the eager and in-place paths run too.

Off by default: the first call of each kernel compiles it (seconds to a minute, cached on disk afterwards) and needs
a C++ compiler on CPU or Triton on GPU. ``with fused_kernels():`` turns it on for a block of code and restores what
was there before on exit (``EvolQModule(fused=True)`` holds it open from setup to teardown).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from evolq_pl.quant import formulas

# inductor options that keep eager's bits: x / s stays a division (not x * (1/s)), casts round as eager does
_EXACT = {"eager_numerics.division_rounding": True, "emulate_precision_casts": True}
_RECOMPILE_LIMIT = 64  # one graph per rank, dtype and per-channel layout; a model has a few dozen

_ENABLED: ContextVar[bool] = ContextVar("evolq_fused_kernels", default=False)
_state: dict[str, Any] = {"kernels": {}, "checked": set()}  # compiled kernels by name; variants checked so far


@contextmanager
def fused_kernels(enabled: bool = True) -> Iterator[None]:
    """Route fake quantization and integer LayerNorm through the compiled kernels (``enabled``) or not, inside the
    block. On exit, also when the block raises, the previous choice comes back, and so does dynamo's recompile
    limit, which is raised while the kernels are on (each kernel compiles one graph per variant). The choice is
    the calling thread's (a ContextVar, as torch's grad mode)."""
    if enabled:
        _check_compile_available()
    import torch._dynamo

    config = torch._dynamo.config
    previous, limit = _ENABLED.get(), config.recompile_limit
    _ENABLED.set(bool(enabled))
    if enabled:
        config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
    try:
        yield
    finally:
        if enabled:
            config.recompile_limit = limit
        _ENABLED.set(previous)


def fused_enabled() -> bool:
    return _ENABLED.get()


def _check_compile_available() -> None:
    if not hasattr(torch, "compile"):
        raise RuntimeError("fused=true needs torch.compile (torch >= 2.0); set fused: false")
    import shutil

    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise RuntimeError("fused=true compiles C++ kernels on CPU but no C++ compiler (g++/clang++) was found; "
                           "install one or set fused: false")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so also the sign of zeros), NaNs at the same places (their payloads may differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan].view(as_int), b[~nan].view(as_int))


# -- the kernels ----------------------------------------------------------------------------------------------------

def traced(fn: Callable[..., Any], **static: Any) -> Callable[..., Any]:
    """The formula ``fn`` on the ``Traced`` backend with its static arguments bound: what ``torch.compile`` sees."""
    def kernel(*args: Any) -> Any:
        return fn(formulas.Traced, *args, **static)

    return kernel


def _kernel_name(fn: Callable[..., Any], static: dict[str, Any]) -> str:
    if fn is formulas.fake_quantize:  # fq_unsigned, fq_signed_ (the trailing _: written over its input), ...
        return f"fq_{'signed' if static['signed'] else 'unsigned'}{'_' if static.get('inplace') else ''}"
    return fn.__name__


def _kernel(name: str, fn: Callable[..., Any], static: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` compiled once per process with shape-generic kernels."""
    kernels = _state["kernels"]
    if name not in kernels:
        kernels[name] = torch.compile(traced(fn, **static), dynamic=True, options=dict(_EXACT))
    return kernels[name]


def _variant(name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What makes the compiler emit another kernel for shape-generic inputs: rank, dtype, device, size-1 dims
    (broadcasting) and layout."""
    return (name, *((a.dim(), a.dtype, a.device.type, tuple(n == 1 for n in a.shape), a.is_contiguous())
                    for a in args if isinstance(a, torch.Tensor)))


class Fused(formulas.InPlace):
    """The in-place backend whose elementwise formulas (``step``) each run as one compiled kernel."""

    @classmethod
    def step(cls, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
        """The compiled ``fn`` on ``args``. A variant's first call also runs ``fn`` on the in-place backend, on
        copies (kernels may write into their inputs), and raises unless every output has the same bits."""
        name = _kernel_name(fn, static)
        kernel = _kernel(name, fn, static)
        key = _variant(name, args)
        if key in _state["checked"]:
            return kernel(*args)
        expected = fn(formulas.InPlace, *(a.clone() if isinstance(a, torch.Tensor) else a for a in args), **static)
        got = kernel(*args)
        pairs = zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]
        if not all(same_bits(g, e) for g, e in pairs):
            device = args[0].device.type
            raise RuntimeError(
                f"fused=true: the compiled {name} kernel ({device}) gives other bits than the same formula run "
                "eagerly, so it would change the search; set fused: false (or clear the inductor cache, "
                "TORCHINDUCTOR_CACHE_DIR, if it is shared with machines of another CPU type)")
        _state["checked"].add(key)
        return got
