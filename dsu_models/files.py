"""Writing files so that a crash never leaves one half-written, and reading
checkpoints safely.

Every file the project writes goes through :func:`atomic_write`: the content
goes to a temporary name in the same folder (same filesystem, so the rename is
atomic), then replaces the target in one ``os.replace``. A reader sees the old
file or the new one, never a mix; a failed write leaves the old file as it was
and no temporary behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch


class CheckpointError(RuntimeError):
    """A saved state file cannot be read (truncated, corrupt, not ours); names the file."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it
    onto ``path``. The temporary name carries the process id, so concurrent
    writers (Ray workers) never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | Path, map_location: torch.device | str = "cpu"):
    """``torch.load`` with ``weights_only=True`` (tensors, dicts, lists, numbers,
    strings: never arbitrary pickles). A file that cannot be read raises
    :class:`CheckpointError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as a saved state ({_why(exc)})") from exc


def _why(exc: Exception) -> str:
    """torch's reason in a few words. Its weights-only refusal suggests loading
    with ``weights_only=False``, which a file of unknown origin must never get."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        return "not a file of plain tensors and containers: truncated, or another kind of file"
    if "central directory" in text or "zip archive" in text:
        return "truncated or damaged: its zip archive is incomplete"
    return text.splitlines()[0] if text else type(exc).__name__
