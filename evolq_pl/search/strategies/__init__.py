"""Search strategies behind one ask/tell interface; ``strategy: <name>`` in a config picks one.

Every module of this package is imported on the first lookup, and each ``Strategy`` subclass with a ``name``
registers itself, so a new strategy is one new file here.
"""

from evolq_pl.search.strategies.base import Strategy, get_strategy, strategy_names

__all__ = ["Strategy", "get_strategy", "strategy_names"]
