"""What to quantize how: presets of the reference (evolq-reference §1.2, §7) as one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from evolq_pl.quant.bit_types import MAX_BITS, MIN_BITS, BitType
from evolq_pl.quant.observers import OBSERVERS

Preset = Literal["e2e", "fq_vit"]


@dataclass(frozen=True)
class QuantConfig:
    """Quantization recipe of a whole model.

    ``e2e`` is what the reference's run script runs: uint-b asymmetric per-channel min-max weights with bias
    correction, uint8 per-tensor OMSE activations, PTF + integer LayerNorm, FP softmax then 8-bit uniform.
    ``fq_vit`` is FQ-ViT's own recipe: signed symmetric min-max weights, min-max activations, PTF + integer LN,
    no bias correction. Every field can be overridden on top of a preset.
    """

    w_bits: int = 4
    a_bits: int = 8
    preset: Preset = "e2e"
    weight_signed: bool = False
    weight_observer: str = "minmax"
    bias_correction: bool = True
    act_observer: str = "omse"
    ptf: bool = True
    int_norm: bool = True
    softmax: Literal["uniform", "log2", "lis"] = "uniform"
    softmax_bits: int = 8
    quantize_input: bool | None = None  # None: DeiT yes, ViT no (as the reference); LeViT yes unless faithful; Swin yes
    fit_on: Literal["last", "all"] = "last"
    faithful: bool = False  # LeViT: leave unquantized what the original leaves unquantized (quirk 18); Swin: no bias correction, as the original (quirk 20)

    def __post_init__(self) -> None:
        for field in ("w_bits", "a_bits", "softmax_bits"):
            bits = getattr(self, field)
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"{field}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}")
        for field in ("weight_observer", "act_observer"):
            if getattr(self, field) not in OBSERVERS or getattr(self, field) == "ptf":
                raise ValueError(f"{field}={getattr(self, field)!r}: choose minmax, ema, percentile or omse")
        if self.preset not in ("e2e", "fq_vit"):
            raise ValueError(f"unknown preset {self.preset!r}: choose e2e or fq_vit")
        if self.softmax not in ("uniform", "log2", "lis"):
            raise ValueError(f"softmax={self.softmax!r}: choose uniform, log2 or lis")
        if self.fit_on not in ("last", "all"):
            raise ValueError(f"fit_on={self.fit_on!r}: choose last or all")

    @classmethod
    def from_preset(cls, preset: Preset = "e2e", **overrides) -> QuantConfig:
        """The preset's values, then ``overrides`` (None values are ignored, so CLI defaults pass through)."""
        base = {
            "e2e": cls(preset="e2e"),
            "fq_vit": cls(preset="fq_vit", weight_signed=True, bias_correction=False, act_observer="minmax"),
        }.get(preset)
        if base is None:
            raise ValueError(f"unknown preset {preset!r}: choose e2e or fq_vit")
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def weight_type(self) -> BitType:
        return BitType(self.w_bits, self.weight_signed)

    @property
    def act_type(self) -> BitType:
        return BitType(self.a_bits, False)

    @property
    def ptf_observer(self) -> str:
        """Observer of LayerNorm inputs / residual sums: PTF, or the plain activation observer without it."""
        return "ptf" if self.ptf else self.act_observer
