"""Checkpoint files that are never half-written: a kill or a full disk mid-save leaves the previous one intact.

Lightning's own TorchCheckpointIO (2.6) serializes to memory and writes through an fsspec transaction, which for a
local path writes a temporary file in the *system* temp folder and then ``shutil.move``s it onto the target. That is
only a rename when the temp folder and the checkpoint folder share a filesystem; otherwise (a tmpfs ``/tmp``, a
mounted run folder) the move copies into the target in place, so a kill or ENOSPC during the copy truncates the
good ``last.ckpt``. Nothing is fsynced, and a killed save leaves its temp file behind in ``/tmp``.

:class:`AtomicCheckpointIO` writes the temporary file *in the checkpoint's own folder*, fsyncs it, and moves it
over the target with ``os.replace`` (atomic on POSIX within a filesystem), then fsyncs the folder. The price is
room for two checkpoints while saving. Loading turns a missing, truncated or foreign file into a one-line error.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "temp_files"]

_TMP_SUFFIX = ".tmp"


def _temp_path(target: Path) -> Path:
    """Hidden, per-process name next to the target; not ``*.ckpt``, so ``ckpt_path='last'`` never picks it."""
    return target.with_name(f".{target.name}.{os.getpid()}{_TMP_SUFFIX}")


def temp_files(target: str | Path) -> list[Path]:
    """Temporary files an interrupted save of ``target`` may have left next to it."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.*{_TMP_SUFFIX}"))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse to open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic and whose load errors say what is wrong in one line."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not _is_local(path):  # object stores: keep Lightning's fsspec upload
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for a local path, got {storage_options!r}")
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # serialize first: a failing write then raises the OS error itself (ENOSPC, EFBIG)
        torch.save(checkpoint, buffer)
        tmp = _temp_path(target)
        try:
            # O_TRUNC: a file of this name can only be left over by a killed process that had our pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            with os.fdopen(fd, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(target.parent)
        for stale in temp_files(target):  # left by saves that were killed before their os.replace
            with contextlib.suppress(OSError):
                stale.unlink()

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if _is_local(path) and not Path(str(path).removeprefix("file://")).is_file():
            raise FileNotFoundError(
                f"checkpoint '{path}' does not exist: give a .ckpt written by cli.py fit, or --ckpt_path last"
            )
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - every reader failure means the same thing to the user
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"checkpoint '{path}' is truncated or not a PyTorch checkpoint ({reason}); "
                "resume from another checkpoint or start the search again"
            ) from None
        if not isinstance(checkpoint, dict):
            raise ValueError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
        return checkpoint
