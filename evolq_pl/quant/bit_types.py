"""Integer grids the quantizers round onto (evolq-reference §1.3)."""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class BitType:
    """A b-bit integer grid, signed ([-2^(b-1), 2^(b-1)-1]) or unsigned ([0, 2^b-1])."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"unsupported bit width {self.bits!r}: use an integer from {MIN_BITS} to {MAX_BITS}"
            )

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


def bit_type(spec: str | int, signed: bool = False) -> BitType:
    """Parse ``"uint4"``/``"int8"`` (or a bare bit count plus ``signed``) into a :class:`BitType`."""
    if isinstance(spec, int):
        return BitType(spec, signed)
    match = re.fullmatch(r"(u?int)(\d+)", str(spec).strip().lower())
    if match is None:
        raise ValueError(f"unknown bit type {spec!r}: use uint2..uint8 or int2..int8")
    return BitType(int(match.group(2)), match.group(1) == "int")
