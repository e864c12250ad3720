"""What every source module provides, and helpers they share.

A source turns its raw input into a :class:`SourcePlan`: the factor table,
channels, output image size, an input fingerprint (for the content hash) and a
list of small picklable *tasks*. ``read(task)`` yields :class:`Chunk` s of at
most a few thousand rows, so preparation holds one chunk per worker in memory
no matter how large the dataset is. Tasks are independent: the Ray job runs
them in parallel, :func:`dsu_models.data.prepare` runs them in a loop, and both
write the same shards.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..base import MISSING, FactorInfo
from ..errors import DataError
from ..splits import val_rows

SPLITS = ("train", "val", "test")
# chunk split codes; VAL came last, so sources written before it keep their codes
TRAIN, TEST, VAL = 0, 1, 2
SPLIT_CODES = {"train": TRAIN, "val": VAL, "test": TEST}

# Options every source accepts, with their defaults (source modules add theirs).
COMMON_OPTIONS = {
    "image_size": None,      # output size; None = the source's DEFAULT_IMAGE_SIZE
    "test_portion": 0.1,     # used only by sources without a standard split
    "val_portion": 0.1,      # share of train carved out as val (by id; 0 = no val split)
    "seed": 0,               # split, subset and plot-subset seed
    "plot_size": 64,         # rows of the small plot/ subset (taken from test)
    "chunk_size": 2048,      # rows per task (layout only; not part of the hash)
    "resize": False,         # allow resizing images whose size differs
}


@dataclass
class Chunk:
    """Rows from one task. split: (n,) int8 (TRAIN, TEST or VAL); ids: (n,) int64;
    images: (n, H, W, C) uint8 at any size (resized later if allowed);
    labels: (n, F) int64 (MISSING = -1 only in an eval-only factor's column);
    where: the file (or generator) the rows came from, for errors;
    notes: what reading did to some inputs that the user should hear of,
    ``{what was done: [file, ...]}`` in row order (e.g. transparency
    composited onto white); preparation reports each once, with the first file
    and the count (``prepared.finish``)."""

    split: np.ndarray
    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    where: str = ""
    notes: dict = field(default_factory=dict)


@dataclass
class SourcePlan:
    """Everything preparation needs; picklable (``read`` is a module function)."""

    source: str
    factors: list[FactorInfo]
    channels: int
    image_size: int
    native_size: int | None
    tasks: list[dict]
    read: Callable[[dict], Iterator[Chunk]]
    options: dict
    fingerprint: dict = field(default_factory=dict)
    # "carved": val is cut from train by val_rows; anything else names where the
    # source's own val rows come from (e.g. "csv") and nothing is carved
    val_from: str = "carved"


def resolve_options(source: str, defaults: dict, given: dict) -> dict:
    """Merge ``given`` over common + source defaults; unknown keys fail loudly."""
    allowed = {**COMMON_OPTIONS, **defaults}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise DataError(f"source {source!r}: unknown option(s) {unknown}; "
                        f"allowed: {sorted(allowed)}")
    opts = {**allowed, **given}
    p = float(opts["test_portion"])
    if not 0.0 < p < 1.0:
        raise DataError(f"source {source!r}: test_portion must be in (0, 1), got {p}")
    v = float(opts["val_portion"])
    if not 0.0 <= v < 1.0:
        raise DataError(f"source {source!r}: val_portion must be in [0, 1), got {v} "
                        f"(the share of train rows held out for validation; 0 = none)")
    if opts["image_size"] is not None and (int(opts["image_size"]) < 2 or int(opts["image_size"]) % 2):
        raise DataError(f"source {source!r}: image_size must be an even integer >= 2, "
                        f"got {opts['image_size']}")
    if int(opts["chunk_size"]) < 1:
        raise DataError(f"source {source!r}: chunk_size must be >= 1, got {opts['chunk_size']}")
    return opts


def test_mask(n: int, test_portion: float, seed: int) -> np.ndarray:
    """Seeded split of n rows: (n,) bool, exactly round(n * test_portion) True."""
    n_test = int(round(n * test_portion))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 0x5EED]).permutation(n)[:n_test]] = True
    return mask


def carve_val(split: np.ndarray, ids: np.ndarray, portion: float, seed: int) -> np.ndarray:
    """Split codes (n,) with the TRAIN rows that :func:`~..splits.val_rows` picks set to VAL."""
    out = np.array(split, dtype=np.int8, copy=True)
    if portion > 0:
        out[(out == TRAIN) & val_rows(ids, portion, seed)] = VAL
    return out


def ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def file_digest(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 of a file's content, read in blocks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def tree_fingerprint(root: Path, paths: list[Path]) -> str:
    """Cheap identity of many files: relative path, size and mtime of each.

    Used for folders of images (a full content hash would read every image
    again on each re-run); single-file sources hash their content instead.
    """
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def require_file(path: Path, dataset: str, fetch: str) -> Path:
    """The path, or a DataError saying where it was expected and how to fetch it."""
    if not path.is_file():
        raise DataError(f"{dataset}: {path} not found. {fetch}")
    return path


def torchvision_fetch_hint(source: str, root: str) -> str:
    return (f"Fetch it with: python pipelines/prepare_data.py {source} --root {root} "
            f"--download --out DIR")


def check_labels(labels: np.ndarray, factors: list[FactorInfo], where: str) -> None:
    """Every label in [0, classes), or MISSING in an eval-only factor; else a
    DataError naming the row and factor."""
    for j, f in enumerate(factors):
        col = labels[:, j]
        low = (col < 0) & ~((col == MISSING) & f.eval_only)
        bad = np.flatnonzero(low | (col >= f.classes))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{where}: row {i}, factor {f.name!r}: label {int(col[i])} is outside "
                            f"the declared classes [0, {f.classes})")
