"""Model-wide quantization state: calibration, quantized and FP modes as reversible switches."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from evolq_pl.quant.layers import QIntLayerNorm, _QWeight
from evolq_pl.quant.quantizer import FakeQuantizer, Log2Quantizer

Quantizer = FakeQuantizer | Log2Quantizer


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer of the model (weights and activations) with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer | Log2Quantizer):
            yield name, m


def weight_layers(model: nn.Module) -> Iterator[tuple[str, _QWeight]]:
    for name, m in model.named_modules():
        if isinstance(m, _QWeight):
            yield name, m


def _state(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    saved = []
    for m in model.modules():
        if isinstance(m, FakeQuantizer | Log2Quantizer):
            saved.append((m, {"enabled": m.enabled, "observing": m.observing, "scoring": m.scoring}))
        elif isinstance(m, QIntLayerNorm):
            saved.append((m, {"int_mode": m.int_mode}))
    return saved


def _restore(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for m, attrs in saved:
        for k, v in attrs.items():
            setattr(m, k, v)


def set_quantized(model: nn.Module, enabled: bool, int_norm: bool | None = None) -> None:
    """Switch fake quantization on or off everywhere; integer LayerNorm follows ``enabled`` unless told."""
    int_norm = enabled if int_norm is None else int_norm
    if enabled:
        missing = [n for n, q in quantizers(model) if not bool(q.calibrated)]
        if missing:
            raise RuntimeError(
                f"{len(missing)} quantizers are not calibrated (first: {missing[0]}): run calibration first"
            )
    for m in model.modules():
        if isinstance(m, FakeQuantizer | Log2Quantizer):
            m.enabled, m.observing, m.scoring = enabled, False, False
        elif isinstance(m, QIntLayerNorm):
            m.int_mode = int_norm and m.use_int


@contextmanager
def quantization_disabled(model: nn.Module, keep_int_norm: bool = False) -> Iterator[nn.Module]:
    """FP mode for a teacher; ``keep_int_norm`` reproduces the original's teacher (quirk 6: integer LN stays on)."""
    saved = _state(model)
    try:
        for m in model.modules():
            if isinstance(m, FakeQuantizer | Log2Quantizer):
                m.enabled = False
            elif isinstance(m, QIntLayerNorm):
                m.int_mode = keep_int_norm and m.use_int
        yield model
    finally:
        _restore(saved)


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


def _lookahead(it: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    iterator = iter(it)
    try:
        prev = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield prev, False
        prev = item
    yield prev, True


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], fit_on: str = "last",
              device: torch.device | str | None = None) -> int:
    """Calibrate every quantizer, then leave the model in quantized mode; returns the number of batches.

    Weight quantizers fit their weights directly. Activation observers see FP activations (quantization off) on
    every batch; OMSE/PTF score only the last batch (``fit_on="last"``, the reference) or, in a second pass,
    every batch (``fit_on="all"``).
    """
    if fit_on not in ("last", "all"):
        raise ValueError(f"fit_on must be 'last' or 'all', not {fit_on!r}")
    if fit_on == "all" and isinstance(batches, Iterator):
        raise ValueError("fit_on='all' reads the calibration batches twice: pass a list or a DataLoader, "
                         "not a one-shot iterator")
    was_training = model.training
    model.eval()
    for _, layer in weight_layers(model):
        layer.calibrate_weight()
    weight_qs = {id(layer.weight_quantizer) for _, layer in weight_layers(model)}
    acts = [q for _, q in quantizers(model) if id(q) not in weight_qs and isinstance(q, FakeQuantizer)]
    for m in model.modules():
        if isinstance(m, QIntLayerNorm):
            m.int_mode = False
    for _, q in quantizers(model):
        q.enabled = False  # observers see FP activations, also when a quantized model is recalibrated
    for q in acts:
        q.observer.reset()
    n = 0
    try:
        for batch, last in _lookahead(batches):
            for q in acts:
                q.observing, q.scoring = True, last and fit_on == "last"
            model(_images(batch).to(device) if device is not None else _images(batch))
            n += 1
        if n == 0:
            raise ValueError("the calibration loader yielded no batches: give it at least one batch of images")
        if fit_on == "all":
            for q in acts:
                q.observing, q.scoring = False, True
            for batch in batches:
                model(_images(batch).to(device) if device is not None else _images(batch))
        for q in acts:
            q.observing = q.scoring = False
            q.finalize()
    finally:
        for q in acts:
            q.observing = q.scoring = False
    set_quantized(model, True)
    model.train(was_training)
    return n


@contextmanager
def quantized_parts(model: nn.Module, weights: bool = True, activations: bool = True, int_norm: bool = True,
                    only_layers: Collection[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Keep only some parts of a calibrated model quantized, to see which part its error comes from: weight
    quantizers, activation quantizers (softmax included) and integer LayerNorm are switched independently;
    ``only_layers`` keeps the weights of just these layers quantized (e.g. those a search tunes)."""
    saved = _state(model)
    try:
        kept = None if only_layers is None else {id(m) for m in only_layers}
        weight_qs = {id(layer.weight_quantizer): kept is None or id(layer) in kept for _, layer in weight_layers(model)}
        for _, q in quantizers(model):
            on = (weights and weight_qs[id(q)]) if id(q) in weight_qs else activations
            q.enabled = q.enabled and on
        for m in model.modules():
            if isinstance(m, QIntLayerNorm):
                m.int_mode = m.int_mode and int_norm
        yield model
    finally:
        _restore(saved)
