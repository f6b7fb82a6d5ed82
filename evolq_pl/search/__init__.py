"""Evol-Q search: block schedule, hyperparameters and the model-free evolutionary core."""

from evolq_pl.search.evolution import Individual, Population, evolve, generation, mutate
from evolq_pl.search.schedule import SearchConfig, block_schedule, default_eps

__all__ = [
    "Individual",
    "Population",
    "SearchConfig",
    "block_schedule",
    "default_eps",
    "evolve",
    "generation",
    "mutate",
]
