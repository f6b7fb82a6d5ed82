"""The search engine's :class:`~evolq_pl.search.engine.Evaluator` for a quantized model and a calibration set.

A block visit runs the model up to the block once per calibration batch and keeps those inputs (``start_block``);
a candidate then costs only the rest of the model (``forward_from``), scored against the FP teacher's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from evolq_pl.fitness import FitnessAccumulator, FitnessFn
from evolq_pl.models.base import QuantizedModel, SearchBlock
from evolq_pl.search.scales import ScaleVector


@torch.no_grad()
def suffix_fitness(qmodel: QuantizedModel, block: int, inputs: list[torch.Tensor], teachers: list[torch.Tensor],
                   fitness_fn: FitnessFn, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sum over batches of the fitness of the logits from block ``block``'s cached inputs, and the batch count.

    The sum stays a device tensor, so scoring a candidate costs one host sync (when the caller reads it), not one
    per batch; the speed benchmark calls this too, so it times exactly what the search runs.
    """
    acc = FitnessAccumulator(device)
    for hidden, teacher in zip(inputs, teachers, strict=True):
        acc.add(fitness_fn(qmodel.forward_from(block, hidden), teacher))
    return acc.total(), len(inputs)


class SuffixEvaluator:
    """Scores search block ``b``'s scales as the mean fitness over this process's calibration batches.

    ``reduce_sum`` (e.g. Lightning's ``strategy.reduce(..., "sum")``) adds a tensor over all processes, so that
    every process, holding its own batches, gets the fitness of the whole calibration set; None for one process.
    """

    def __init__(self, qmodel: QuantizedModel, blocks: Sequence[SearchBlock], batches: list[torch.Tensor],
                 teachers: list[torch.Tensor], fitness_fn: FitnessFn, device: torch.device,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.qmodel, self.batches, self.teachers, self.fitness_fn = qmodel, batches, teachers, fitness_fn
        self.device, self.reduce_sum = device, reduce_sum
        self.scales = [ScaleVector(block.layers) for block in blocks]
        self._inputs: list[torch.Tensor] = []

    @torch.no_grad()
    def start_block(self, block: int) -> None:
        self._inputs = [self.qmodel.forward_to(block, x) for x in self.batches]

    def end_block(self, block: int) -> None:
        self._inputs = []

    def fitness(self, block: int) -> float:
        """Mean fitness of the model as it stands, from the inputs cached for ``block``."""
        total, count = suffix_fitness(self.qmodel, block, self._inputs, self.teachers, self.fitness_fn, self.device)
        if self.reduce_sum is None:
            return float(total) / count  # one host sync per candidate, none per batch
        total = self.reduce_sum(total)
        return FitnessAccumulator.mean_of(total, self.reduce_sum(torch.tensor(float(count), dtype=torch.float64,
                                                                               device=self.device)))

    def evaluate(self, block: int, scales: torch.Tensor) -> float:
        self.apply(block, scales)
        return self.fitness(block)

    def apply(self, block: int, scales: torch.Tensor) -> None:
        self.scales[block].set(scales)

    def get(self, block: int) -> torch.Tensor:
        return self.scales[block].get()
