"""Steady-state evolutionary search over one block's weight-scale vector (reference §2.3); no model inside.

All randomness comes from a caller-owned `numpy.random.Generator`, so one seed fixes the whole search and the
generator's `bit_generator.state` can be checkpointed next to `Population.state_dict()`.

Ordering rule used everywhere: an individual ranks by (fitness, uid), lower is better. uids grow with age,
so among exact fitness ties the older individual wins. This replaces the reference's comparison of
(loss, array) tuples, which raises on ties between different arrays (quirk 9). A consequence: a child whose
fitness ties the worst member is the one dropped, so a population of identical copies only changes when a
child is strictly better than them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_MIN_SCALE = float(torch.finfo(torch.float32).eps)


@dataclass
class Individual:
    """One candidate scale vector with its fitness (lower is better); non-finite fitness is stored as +inf."""

    fitness: float
    scales: torch.Tensor
    uid: int

    def __post_init__(self) -> None:
        f = float(self.fitness)
        self.fitness = f if math.isfinite(f) else math.inf


def _rank(ind: Individual) -> tuple[float, int]:
    return (ind.fitness, ind.uid)


class Population:
    """A fixed-size population with tournament selection and steady-state (mu + 1) replacement."""

    def __init__(self, members: list[Individual], next_uid: int | None = None) -> None:
        if not members:
            raise ValueError("a Population needs at least one member; build it with Population.from_initial")
        uids = [m.uid for m in members]
        if len(set(uids)) != len(uids):
            raise ValueError(f"Population members need distinct uids, got {uids}")
        self._members = list(members)
        self._next_uid = max(uids) + 1 if next_uid is None else int(next_uid)
        if self._next_uid <= max(uids):
            raise ValueError(f"next_uid ({self._next_uid}) must exceed every member uid (max {max(uids)})")

    @classmethod
    def from_initial(cls, scales: torch.Tensor, fitness: float, size: int) -> Population:
        """`size` copies of one vector sharing one evaluated fitness (uids 0..size-1), as in the reference."""
        if size < 1:
            raise ValueError(f"population size must be >= 1, got {size}")
        base = scales.detach()
        return cls([Individual(fitness, base.clone(), uid) for uid in range(size)], next_uid=size)

    @property
    def next_uid(self) -> int:
        """The uid to give the next child (one more than any uid ever seen)."""
        return self._next_uid

    @property
    def members(self) -> tuple[Individual, ...]:
        """The current members, in insertion order."""
        return tuple(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Individual]:
        return iter(tuple(self._members))

    def tournament(self, size: int, rng: np.random.Generator) -> Individual:
        """Draw `size` members uniformly with replacement (`rng.integers`) and return the best of them."""
        if size < 1:
            raise ValueError(f"tournament size must be >= 1, got {size}")
        idx = rng.integers(0, len(self._members), size=size)
        return min((self._members[i] for i in idx.tolist()), key=_rank)

    def add_and_drop_worst(self, child: Individual) -> Individual:
        """Insert `child`, then remove and return the worst member by (fitness, uid); keeps the size."""
        if any(m.uid == child.uid for m in self._members):
            raise ValueError(
                f"uid {child.uid} is already in the population; give children Population.next_uid"
            )
        self._members.append(child)
        self._next_uid = max(self._next_uid, child.uid + 1)
        worst = max(range(len(self._members)), key=lambda i: _rank(self._members[i]))
        return self._members.pop(worst)

    def best(self) -> Individual:
        """The member with the lowest (fitness, uid)."""
        return min(self._members, key=_rank)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the search exactly (pair it with the rng's bit_generator.state)."""
        return {
            "fitness": [m.fitness for m in self._members],
            "scales": [m.scales.detach().clone() for m in self._members],
            "uids": [m.uid for m in self._members],
            "next_uid": self._next_uid,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this population's contents with a `state_dict()` (sizes may differ)."""
        restored = self.from_state_dict(state)
        self._members = restored._members
        self._next_uid = restored._next_uid

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Population:
        """Build a population from a `state_dict()`."""
        fit, scales, uids = state["fitness"], state["scales"], state["uids"]
        if not len(fit) == len(scales) == len(uids):
            raise ValueError(
                f"corrupt population state: {len(fit)} fitness values, {len(scales)} scale tensors, "
                f"{len(uids)} uids"
            )
        members = [
            Individual(float(f), s.detach().clone(), int(u))
            for f, s, u in zip(fit, scales, uids, strict=True)
        ]
        return cls(members, next_uid=int(state["next_uid"]))


def mutate(
    scales: torch.Tensor, eps: float, rng: np.random.Generator, relative: bool = False
) -> torch.Tensor:
    """Child scales |s + u| (or |s(1 + u)| if `relative`), u ~ U(-eps, eps) i.i.d., clamped to >= float32 eps.

    The noise is drawn in float64 on CPU from `rng`, so one seed gives the same child on any device; the
    result has the dtype and device of `scales`. The clamp keeps a scale from reaching 0, which would divide
    by zero in the quantizer (the reference's absolute-value reflection alone allows it).
    """
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"mutation eps must be a finite number > 0, got {eps}")
    noise = torch.from_numpy(rng.uniform(-eps, eps, size=scales.numel())).reshape(scales.shape)
    base = scales.detach().to(device="cpu", dtype=torch.float64)
    child = base * (1.0 + noise) if relative else base + noise
    child = child.abs().clamp_min(_MIN_SCALE)
    return child.to(device=scales.device, dtype=scales.dtype)


def propose(
    pop: Population, eps: float, tournament_size: int, rng: np.random.Generator, relative: bool = False
) -> torch.Tensor:
    """A child's scales: the winner of one tournament, mutated (the rng draws the tournament, then the noise)."""
    parent = pop.tournament(tournament_size, rng)
    return mutate(parent.scales, eps, rng, relative=relative)


def admit(pop: Population, scales: torch.Tensor, fitness: float) -> tuple[Individual, bool]:
    """Insert a scored child as the youngest member and drop the worst; returns the child and whether it stayed."""
    child = Individual(float(fitness), scales, pop.next_uid)
    dropped = pop.add_and_drop_worst(child)
    return child, dropped.uid != child.uid


def generation(
    pop: Population,
    evaluate: Callable[[torch.Tensor], float],
    eps: float,
    tournament_size: int,
    rng: np.random.Generator,
    relative: bool = False,
) -> tuple[Individual, bool]:
    """One steady-state generation: propose a child, evaluate it, admit it (insert, drop the worst).

    Returns the child and whether it survived the replacement.
    """
    child_scales = propose(pop, eps, tournament_size, rng, relative)
    return admit(pop, child_scales, evaluate(child_scales))


def evolve(
    pop: Population,
    evaluate: Callable[[torch.Tensor], float],
    eps: float,
    tournament_size: int,
    num_cycles: int,
    rng: np.random.Generator,
    relative: bool = False,
) -> Individual:
    """Run `num_cycles` generations (one block visit of the reference) and return the best individual."""
    if num_cycles < 1:
        raise ValueError(f"num_cycles must be >= 1, got {num_cycles}")
    for _ in range(num_cycles):
        generation(pop, evaluate, eps, tournament_size, rng, relative=relative)
    return pop.best()
