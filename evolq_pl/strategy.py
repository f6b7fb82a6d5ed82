"""Multi-process search: Lightning's DDP process group without torch's DistributedDataParallel wrapper.

The search has no gradients: ranks share work only through the fitness all-reduce (``trainer.strategy.reduce``).
DistributedDataParallel refuses a module with no parameter that requires grad (the quantized model has none), and
would broadcast every buffer before each forward. Lightning itself skips the wrapper outside fitting; this
strategy skips it while fitting too and only makes every rank start from rank 0's parameters and buffers.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

__all__ = ["SearchDDPStrategy", "check_search_strategy", "search_strategy_for"]


class SearchDDPStrategy(DDPStrategy):
    """DDPStrategy for gradient-free modules: same launch, process group, reduce and rank-0-only checkpoints."""

    strategy_name = "evolq_ddp"

    def configure_ddp(self) -> None:
        assert self.model is not None
        with torch.no_grad():
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                dist.broadcast(tensor, src=0)


def search_strategy_for(strategy: object) -> object:
    """Replace a registered DDP strategy name (``ddp``, ``ddp_spawn``, ...) with SearchDDPStrategy, same options."""
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    if entry["strategy"] is not DDPStrategy:
        return strategy
    return SearchDDPStrategy(**entry["init_params"])


def check_search_strategy(strategy: object) -> None:
    """Refuse Lightning's DDPStrategy itself, whose gradient wrapper the search cannot run under."""
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, SearchDDPStrategy):
        raise ValueError("DDPStrategy wraps the model in DistributedDataParallel, which needs gradients the search "
                         "does not have: pass strategy=evolq_pl.strategy.SearchDDPStrategy() (cli.py maps "
                         "--trainer.strategy ddp to it)")
