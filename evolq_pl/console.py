"""A quiet console: Lightning's messages that do not apply to a gradient-free search, silenced by their exact text.

The causes of the other messages a fit used to print are gone (cli.py sets ``max_epochs`` and the seed, the module has
an optimizer, the training clock is not an IterableDataset, no empty held-out loader is built). What is left is
silenced here, in one place, only inside :func:`quiet_lightning`, which puts the warning filters and the logger back
as they were on exit.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

SILENCED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # ModelCheckpoint with manual optimization asks for a copy of the model taken before optimizer.step(); the
    # search's optimizer changes nothing, and the checkpoint after a generation is the one to keep
    (UserWarning, "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization "
                  "state was saved."),
    # Lightning 2.6 flattens every batch with torch's LeafSpec, which torch 2.10+ deprecates: nothing a user can change
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                    "treespec.is_leaf()` instead."),
)
SILENCED_LOGS: tuple[tuple[str, str], ...] = (
    # an advertisement printed by every Trainer without Lightning's cloud logger
    ("lightning.pytorch.utilities.rank_zero",
     "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence :data:`SILENCED_WARNINGS` and :data:`SILENCED_LOGS` for a block of code."""
    prefixes: dict[str, list[str]] = {}
    for name, prefix in SILENCED_LOGS:
        prefixes.setdefault(name, []).append(prefix)
    filters = {name: _DropMessages(texts) for name, texts in prefixes.items()}
    with warnings.catch_warnings():
        for category, message in SILENCED_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        for name, log_filter in filters.items():
            logging.getLogger(name).addFilter(log_filter)
        try:
            yield
        finally:
            for name, log_filter in filters.items():
                logging.getLogger(name).removeFilter(log_filter)
