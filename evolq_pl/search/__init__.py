"""Evol-Q search: block schedule, hyperparameters, the model-free evolutionary core, strategies and the engine."""

from evolq_pl.search.engine import Evaluator, Generation, SearchEngine, SearchState
from evolq_pl.search.evolution import Individual, Population, admit, evolve, generation, mutate, propose
from evolq_pl.search.schedule import SearchConfig, block_schedule, default_eps
from evolq_pl.search.strategies import Strategy, get_strategy, strategy_names

__all__ = [
    "Evaluator",
    "Generation",
    "Individual",
    "Population",
    "SearchConfig",
    "SearchEngine",
    "SearchState",
    "Strategy",
    "admit",
    "block_schedule",
    "default_eps",
    "evolve",
    "generation",
    "get_strategy",
    "mutate",
    "propose",
    "strategy_names",
]
