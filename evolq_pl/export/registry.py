"""One exporter per quantized model family, and the one door from a quantized model to an ONNX graph.

A family exporter is ``fn(emitter, model, images) -> logits``: it walks the family's forward with the per-layer
emitters. A family added to ``evolq_pl.models`` registers its exporter here (``@register_exporter``); a model
without one is refused with a one-line error, and so is an exporter that leaves a quantizer out of the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import onnx

from evolq_pl.export.emitters import Emitter
from evolq_pl.export.errors import ExportError
from evolq_pl.export.graph import Graph, float_input
from evolq_pl.models.base import QuantizedModel
from evolq_pl.quant.layers import QIntLayerNorm
from evolq_pl.quant.modes import quantizers, set_quantized

Exporter = Callable[[Emitter, QuantizedModel, str], str]
EXPORTERS: dict[type, tuple[str, Exporter]] = {}


def register_exporter(model_class: type, label: str) -> Callable[[Exporter], Exporter]:
    """Decorator: ``fn(emitter, model, images) -> logits`` exports instances of ``model_class``."""

    def wrap(fn: Exporter) -> Exporter:
        EXPORTERS[model_class] = (label, fn)
        return fn

    return wrap


def exporter_for(model: QuantizedModel) -> tuple[str, Exporter]:
    for cls in type(model).__mro__:
        if cls in EXPORTERS:
            return EXPORTERS[cls]
    known = ", ".join(label for label, _ in EXPORTERS.values())
    raise ExportError(f"model family {type(model).__name__} has no ONNX exporter (exportable: {known}); write one "
                      "with evolq_pl.export.registry.register_exporter")


@contextmanager
def quantized_mode(model: QuantizedModel) -> Iterator[None]:
    """Every quantizer on (as the model is evaluated), the previous switches restored on exit."""
    saved = [(q, q.enabled, q.observing, q.scoring) for _, q in quantizers(model)]
    norms = [(m, m.int_mode) for m in model.modules() if isinstance(m, QIntLayerNorm)]
    try:
        set_quantized(model, True)
    except RuntimeError as err:
        raise ExportError(f"cannot export an uncalibrated model: {err}") from None
    try:
        yield
    finally:
        for q, enabled, observing, scoring in saved:
            q.enabled, q.observing, q.scoring = enabled, observing, scoring
        for m, int_mode in norms:
            m.int_mode = int_mode


def build_onnx(model: QuantizedModel, input_shape: Sequence[int], quantized: bool = True,
               doc: str = "") -> tuple[onnx.ModelProto, Emitter]:
    """The model as an ONNX graph ``images [batch, C, H, W] -> logits [batch, classes]``: integer weights and
    Q/DQ activations, or with ``quantized=False`` the FP model through the same emitters."""
    label, exporter = exporter_for(model)
    graph = Graph()
    emitter = Emitter(graph, model, quantized)
    images = graph.name("images")
    with quantized_mode(model):
        logits = exporter(emitter, model, images)
    missing = [name for name, q in quantizers(model) if id(q) not in emitter.emitted]
    if missing:
        raise ExportError(f"the {label} exporter leaves {len(missing)} quantizer(s) out of the graph (first: "
                          f"{missing[0]}): the model has a part its exporter does not know")
    graph.op("Identity", [logits], "output")
    graph.nodes[-1].output[0] = "logits"
    model_proto = graph.model([float_input(images, ["batch", *input_shape])],
                              [float_input("logits", ["batch", model.num_classes])], doc=doc,
                              metadata={"model": model.model_name, "family": label,
                                        "quantized": str(quantized).lower(), "qconfig": repr(model.qconfig)})
    return model_proto, emitter
