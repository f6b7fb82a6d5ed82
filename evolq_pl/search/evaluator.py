"""The search engine's :class:`~evolq_pl.search.engine.Evaluator` for a quantized model and a calibration set.

A block visit runs the model up to the block once per calibration batch and keeps those inputs (``start_block``);
a candidate then costs only the rest of the model (``forward_from``), scored against the FP teacher's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import torch
import torch.nn.functional as TF

from evolq_pl.fitness import FitnessAccumulator, FitnessFn
from evolq_pl.models.base import QuantizedModel, SearchBlock
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.modes import quantization_disabled
from evolq_pl.search.scales import ScaleVector


@torch.no_grad()
def fp_teachers(qmodel: QuantizedModel, batches: Sequence[torch.Tensor], keep_int_norm: bool = False,
                ) -> list[torch.Tensor]:
    """What the fitness compares a candidate's logits with: the model's own with every quantizer off, in fp32, per
    batch; ``keep_int_norm`` keeps integer LayerNorm on, as the original code's teacher does (``teacher: int_ln``)."""
    with quantization_disabled(qmodel, keep_int_norm=keep_int_norm):
        return [qmodel(x).float() for x in batches]


def _weight_rows(layer: QLinear | QConv2d, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer's flattened weight multiplies: a linear layer's input tokens, a convolution's input patches
    (``unfold``, one row per output position), so that its output channel c is ``rows @ weight[c].flatten()``."""
    if isinstance(layer, QConv2d):
        patches = TF.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def suffix_fitness(qmodel: QuantizedModel, start: int | None, inputs: list[torch.Tensor],
                   teachers: list[torch.Tensor], fitness_fn: FitnessFn, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sum over batches of the fitness of the logits from the cached inputs of a unit starting at ``start``
    (``SearchBlock.start``: a block index, or None for the images), and the batch count.

    The sum stays a device tensor, so scoring a candidate costs one host sync (when the caller reads it), not one
    per batch; the speed benchmark calls this too, so it times exactly what the search runs.
    """
    acc = FitnessAccumulator(device)
    for hidden, teacher in zip(inputs, teachers, strict=True):
        acc.add(fitness_fn(qmodel.suffix(start, hidden), teacher))
    return acc.total(), len(inputs)


@contextmanager
def per_candidate_weights(layers: Sequence[QLinear | QConv2d],
                          params: list[list[tuple[torch.Tensor, torch.Tensor | None]]]) -> Iterator[None]:
    """Within the block, each layer computes the i-th of ``len(params)`` equal slices of its input batch with
    candidate i's weight and bias (``params[i][layer]``), the op ``QLinear.forward`` (``QConv2d.forward``) runs with
    that candidate's scales; every other module sees one batch of all candidates' images."""
    count = len(params)

    def forward_for(j: int, layer: QLinear | QConv2d):
        op = TF.linear if isinstance(layer, QLinear) else layer._conv_forward  # the op the layer's forward runs

        def forward(x: torch.Tensor) -> torch.Tensor:
            slices = x.split(x.shape[0] // count)
            return torch.cat([op(xs, *p[j]) for xs, p in zip(slices, params, strict=True)])
        return forward

    for j, layer in enumerate(layers):
        if not isinstance(layer, QLinear | QConv2d):
            raise TypeError(f"batched evaluation patches QLinear and QConv2d layers only, got {type(layer).__name__}")
        layer.forward = forward_for(j, layer)  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _BlockDone(Exception):
    """Raised by a forward hook to stop a forward once the searched block's layers have all run."""


class SuffixEvaluator:
    """Scores search block ``b``'s scales as the mean fitness over this process's calibration batches.

    ``reduce_sum`` (e.g. Lightning's ``strategy.reduce(..., "sum")``) adds a tensor over all processes, so that
    every process, holding its own batches, gets the fitness of the whole calibration set; None for one process.
    ``evaluate_many`` scores up to ``stack`` candidates in one pass over the cached inputs (1: one by one). By default
    a CPU scores them one by one: stacking measured no faster there (one thread, DeiT-Tiny:
    benchmarks/results/batched_speed_cpu_deit_tiny.json); other devices stack 8.
    """

    def __init__(self, qmodel: QuantizedModel, blocks: Sequence[SearchBlock], batches: list[torch.Tensor],
                 teachers: list[torch.Tensor], fitness_fn: FitnessFn, device: torch.device,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, stack: int | None = None) -> None:
        stack = stack if stack is not None else 1 if torch.device(device).type == "cpu" else 8
        if stack < 1:
            raise ValueError(f"stack must be >= 1 candidate per pass, got {stack}")
        self.qmodel, self.batches, self.teachers, self.fitness_fn = qmodel, batches, teachers, fitness_fn
        self.device, self.reduce_sum, self.stack = device, reduce_sum, stack
        self.starts = [block.start for block in blocks]
        self.scales = [ScaleVector(block.layers) for block in blocks]
        self._inputs: list[torch.Tensor] = []
        self._moments: list[torch.Tensor] | None = None

    @torch.no_grad()
    def start_block(self, block: int) -> None:
        self._inputs = [self.qmodel.prefix(self.starts[block], x) for x in self.batches]

    def end_block(self, block: int) -> None:
        self._inputs, self._moments = [], None

    @torch.no_grad()
    def _input_moments(self, block: int) -> list[torch.Tensor]:
        """Per searched layer, the sum over calibration tokens of x xᵀ of its input x (over all processes), with the
        model as it stands: one forward over the cached inputs that stops once every searched layer has run."""
        layers = self.scales[block].layers
        odd = [layer for layer in layers if isinstance(layer, QConv2d) and (
            layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str))]
        if odd:
            raise TypeError("layer-local errors need plain convolutions (one group, numeric zero padding); this "
                            f"block has {odd[0]}")
        moments = [torch.zeros(layer.weight[0].numel(), layer.weight[0].numel(), dtype=torch.float64,
                               device=self.device) for layer in layers]
        seen: set[int] = set()

        def record(j: int):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                x = _weight_rows(module, args[0].detach()).double()
                moments[j] += x.T @ x
                seen.add(j)
                if len(seen) == len(layers):
                    raise _BlockDone
            return hook

        handles = [layer.register_forward_hook(record(j)) for j, layer in enumerate(layers)]
        try:
            for hidden in self._inputs:
                seen.clear()
                with suppress(_BlockDone):
                    self.qmodel.suffix(self.starts[block], hidden)
        finally:
            for handle in handles:
                handle.remove()
        return [m if self.reduce_sum is None else self.reduce_sum(m) for m in moments]

    @torch.no_grad()
    def local_errors(self, block: int, candidates: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each candidate's error per scale: ‖X(ŵ_c − w_c)‖² summed over the calibration tokens X entering the
        channel's layer (a convolution's: its input patches), where ŵ_c is output channel c's weight quantized with
        that scale and w_c its FP weight.

        A channel's output depends on its own scale only, so the errors are separable, and scoring one costs a
        small matrix product instead of a pass over the model (``(len(candidates), numel)``, float64).
        """
        if self._moments is None:
            self._moments = self._input_moments(block)
        vector = self.scales[block]
        out = torch.empty(len(candidates), vector.numel, dtype=torch.float64)
        for i, scales in enumerate(candidates):
            chunks = torch.split(scales.reshape(-1), vector.sizes)
            row = []
            for layer, moment, chunk in zip(vector.layers, self._moments, chunks, strict=True):
                diff = (layer.weight_for_scale(chunk) - layer.weight.detach().float()).double().flatten(1)
                row.append(((diff @ moment) * diff).sum(dim=1).cpu())
            out[i] = torch.cat(row)
        return out

    def fitness(self, block: int) -> float:
        """Mean fitness of the model as it stands, from the inputs cached for ``block``."""
        total, count = suffix_fitness(self.qmodel, self.starts[block], self._inputs, self.teachers, self.fitness_fn,
                                      self.device)
        return self._means(total, count)[0]

    def _means(self, totals: torch.Tensor, count: int) -> list[float]:
        """Per-candidate means from per-candidate sums over ``count`` batches (over all processes: one reduce)."""
        if self.reduce_sum is None:
            return [float(t) / count for t in totals.reshape(-1).tolist()]  # one host sync, none per batch
        totals = self.reduce_sum(totals)
        n = self.reduce_sum(torch.tensor(float(count), dtype=torch.float64, device=self.device))
        return [FitnessAccumulator.mean_of(t, n) for t in totals.reshape(-1)]

    def calibration_share(self, fraction: float) -> float:
        """``evaluate_many(..., fraction)`` scores on this process's first ``max(1, round(fraction * n))`` of its
        n batches: that share (a whole batch is the smallest unit)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction of the calibration set must be in (0, 1], got {fraction}")
        n = len(self._inputs) or len(self.batches)
        return max(1, round(fraction * n)) / n

    def _first_batches(self, fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This process's cached block inputs and teacher logits of ``calibration_share(fraction)``."""
        k = round(self.calibration_share(fraction) * len(self._inputs))
        return self._inputs[:k], self.teachers[:k]

    @torch.no_grad()
    def evaluate_many(self, block: int, candidates: Sequence[torch.Tensor], fraction: float = 1.0) -> list[float]:
        """``evaluate`` of each candidate, ``stack`` at a time: the cached inputs repeated once per candidate along
        the batch, the block's layers computing each slice with its candidate's weights, the rest of the model
        run once on the stacked batch. The model holds the last candidate afterwards."""
        inputs, teachers = self._first_batches(fraction)
        k = len(inputs)
        layers = self.scales[block].layers
        out: list[float] = []
        if self.stack == 1:  # one after another, the plain suffix (no stacking, no patched layers)
            for scales in candidates:
                self.apply(block, scales)
                total, _ = suffix_fitness(self.qmodel, self.starts[block], inputs, teachers, self.fitness_fn,
                                          self.device)
                out += self._means(total, k)
            return out
        for start in range(0, len(candidates), self.stack):
            group = candidates[start:start + self.stack]
            params = []
            for scales in group:  # each candidate's weights, quantized once for all batches
                self.apply(block, scales)
                params.append([layer.compute_params(inputs[0]) for layer in layers])
            accs = [FitnessAccumulator(self.device) for _ in group]
            with per_candidate_weights(layers, params):
                for hidden, teacher in zip(inputs, teachers, strict=True):
                    stacked = hidden.repeat(len(group), *[1] * (hidden.dim() - 1))
                    logits = self.qmodel.suffix(self.starts[block], stacked)
                    for acc, part in zip(accs, logits.split(len(hidden)), strict=True):
                        acc.add(self.fitness_fn(part, teacher))
            out += self._means(torch.stack([acc.total() for acc in accs]), k)
        return out

    def gradient(self, block: int, scales: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
        """The gradient of the mean fitness with respect to ``scales`` on ``calibration_share(fraction)`` of the
        calibration set (over all processes), through the straight-through roundings and integer steps' float
        stand-ins (``functional.straight_through``): a direction to propose along, never a fitness to keep by.
        The model's scales are left as they were."""
        inputs, teachers = self._first_batches(fraction)
        vector = self.scales[block]
        leaf = scales.detach().to(self.device, torch.float32).reshape(-1).clone().requires_grad_(True)
        grad = torch.zeros_like(leaf)
        with torch.enable_grad():
            for hidden, teacher in zip(inputs, teachers, strict=True):
                chunks = torch.split(leaf, vector.sizes)
                params = [[(layer.weight_for_scale(c), layer.bias) for layer, c in zip(vector.layers, chunks,
                                                                                        strict=True)]]
                with per_candidate_weights(vector.layers, params):
                    loss = self.fitness_fn(self.qmodel.suffix(self.starts[block], hidden), teacher)
                grad += torch.autograd.grad(loss, leaf)[0]
        n = torch.tensor(float(len(inputs)), dtype=torch.float64, device=self.device)
        if self.reduce_sum is not None:
            grad, n = self.reduce_sum(grad), self.reduce_sum(n)
        return (grad / n.to(grad.dtype)).to(scales.device).reshape(scales.shape)

    def evaluate(self, block: int, scales: torch.Tensor) -> float:
        self.apply(block, scales)
        return self.fitness(block)

    def apply(self, block: int, scales: torch.Tensor) -> None:
        self.scales[block].set(scales)

    def get(self, block: int) -> torch.Tensor:
        return self.scales[block].get()
