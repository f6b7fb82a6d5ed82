"""What the search and the Lightning module may ask of a quantized model, whatever its family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evolq_pl.quant.config import QuantConfig
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import quantizers
from evolq_pl.quant.quantizer import FakeQuantizer


@dataclass(frozen=True)
class SearchBlock:
    """One unit of the search: a name, the weight-quantized layers (QLinear, QConv2d) whose scales it perturbs, and
    where a candidate's rerun starts: the input of block ``start`` (``forward_to``/``forward_from``), or the images
    for None (a unit in the stem, before every block)."""

    name: str
    layers: tuple[QLinear | QConv2d, ...]
    start: int | None

    @property
    def bits(self) -> int:
        """Bit width that picks ε: the block's output projection, as the reference (§2.1)."""
        return self.layers[-1].weight_quantizer.bit_type.bits


class QuantizedModel(nn.Module):
    """A timm classifier with fake quantizers at the reference's tensor map.

    Families implement ``forward_to(i, x)`` (the input of search block ``i``, i.e. everything before it) and
    ``forward_from(i, h)`` (logits from that input), so a candidate for block ``i`` only reruns the suffix.
    """

    model_name: str
    qconfig: QuantConfig
    input_size: tuple[int, int, int] | None = None
    """(channels, height, width) the FP model was built for; None where a family does not say."""

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse images of another size in one line: a ViT would silently drop the pixels past its patch grid."""
        if self.input_size is not None and tuple(x.shape[1:]) != self.input_size:
            given, built = ("x".join(map(str, s)) for s in (tuple(x.shape[1:]), self.input_size))
            raise ValueError(f"images of {given} (channels x height x width) do not fit {self.model_name}, built for "
                             f"{built}: give the data module that image size, or build the model for the images "
                             "(model_kwargs img_size / in_chans)")

    @property
    def num_classes(self) -> int:
        """Classes the logits cover (sizes the accuracy metrics); every family keeps its classifier as ``head``."""
        return self.head.out_features

    def block_units(self, include_mlp: bool = False) -> list[SearchBlock]:
        """One search unit per block, in forward order; unit ``i`` starts at block ``i``."""
        raise NotImplementedError

    def end_layers(self) -> tuple[tuple[QLinear | QConv2d, ...], tuple[QLinear | QConv2d, ...]]:
        """The weight-quantized layers before the first block (stem, patch embedding) and after the last (head)."""
        raise NotImplementedError

    def search_blocks(self, include_mlp: bool = False, include_head: bool = False, include_stem: bool = False,
                      joint: bool = False) -> list[SearchBlock]:
        """The units of the search: one per block (``block_units``), then with ``include_head`` the classifier head
        (rerun from the last block's output) and with ``include_stem`` the stem or patch embedding (rerun from the
        images); the paper searches the blocks' attention only. The search visits units last to first, so these
        first. ``joint`` makes the blocks and the head one unit, rerun from block 0's input; the stem stays a unit
        of its own, as no gradient step lowers its fitness (benchmarks/RESULTS.md, "Round 4")."""
        units = self.block_units(include_mlp)
        stem, head = self.end_layers() if include_head or include_stem else ((), ())
        if include_head:
            units.append(SearchBlock("head", head, len(units)))
        if joint:
            units = [SearchBlock("all", tuple(layer for u in units for layer in u.layers), 0)]
        if include_stem:
            units.append(SearchBlock("stem", stem, None))
        return units

    def forward_to(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_from(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefix(self, start: int | None, x: torch.Tensor) -> torch.Tensor:
        """What a unit starting at ``start`` (``SearchBlock.start``) caches per image batch: its input."""
        return x if start is None else self.forward_to(start, x)

    def suffix(self, start: int | None, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from a cached ``prefix``: the part of the model a candidate for that unit reruns."""
        return self(hidden) if start is None else self.forward_from(start, hidden)

    def quant_map(self) -> list[dict[str, str]]:
        """Every quantized tensor: where, what kind, bits, granularity, observer (users ask what is quantized)."""
        rows = []
        for name, q in quantizers(self):
            kind = "weight" if name.endswith("weight_quantizer") else "activation"
            rows.append({
                "tensor": name.removesuffix(".weight_quantizer").removesuffix(".quantizer"),
                "kind": kind,
                "quantizer": "uniform" if isinstance(q, FakeQuantizer) else "log2",
                "bits": q.bit_type.name,
                "granularity": q.granularity,
                "observer": q.observer_name,
                "bias_correction": "yes" if kind == "weight" and self.get_submodule(
                    name.removesuffix(".weight_quantizer")).bias_correction else "",
            })
        return rows

    def format_quant_map(self) -> str:
        """The quantization map as a plain-text table (printed before a run and saved beside results)."""
        rows = self.quant_map()
        cols = list(rows[0]) if rows else []
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
        line = "  ".join(c.ljust(widths[c]) for c in cols)
        out = [f"# quantization map of {self.model_name}: {len(rows)} quantizers, {self.qconfig}", line,
               "  ".join("-" * widths[c] for c in cols)]
        out += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(out)
