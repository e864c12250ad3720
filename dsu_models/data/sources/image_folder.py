"""``image_folder``: any folder of images plus a CSV of labels.

The CSV (option ``csv``, default ``ROOT/labels.csv``) has a file column
(``file_column``, default ``file``, paths relative to ROOT), one column per
factor and optionally a ``split`` column (``train`` / ``test``; otherwise a
seeded ``test_portion`` is held out). A factor column holds either
non-negative integers (classes 0..max, or ``classes[name]`` if declared) or
strings (class ids by sorted name; the names are kept). Declaring
``factors`` makes missing and extra columns errors. Every image must have the
first image's size and channel count unless ``resize`` is set, which converts
channels, crops the centred square and resizes to ``image_size``.
ids are CSV data-row numbers (0-based).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from . import _images
from ._common import SourcePlan, Chunk, TEST, TRAIN, file_digest, ranges, test_mask, tree_fingerprint

NAME = "image_folder"
FACTORS: list = []          # from the CSV
DEFAULT_IMAGE_SIZE = None   # the images' own size
CHANNELS = None             # the images' own channel count
OPTIONS = {"root": None, "csv": None, "file_column": "file", "factors": None, "classes": None,
           "channels": None}
_INT = re.compile(r"^[+-]?\d+$")


def _read_csv(path: Path, file_col: str, declared: list[str] | None):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty CSV (no header)")
            header = [h.strip() for h in header]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {path}: {e}") from e
    if file_col not in header:
        raise DataError(f"{path}: missing file column {file_col!r}; header is {header}")
    names = [h for h in header if h not in (file_col, "split")]
    if declared is not None:
        missing = [d for d in declared if d not in names]
        extra = [h for h in names if h not in declared]
        if missing:
            raise DataError(f"{path}: missing factor column(s) {missing}; header is {header}")
        if extra:
            raise DataError(f"{path}: unexpected column(s) {extra} (declared factors {declared}); "
                            f"header is {header}")
        names = list(declared)
    if not names:
        raise DataError(f"{path}: no factor columns besides {file_col!r}; header is {header}")
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise DataError(f"{path}: line {i + 2} has {len(r)} fields, header has {len(header)}")
    if not rows:
        raise DataError(f"{path}: no data rows")
    cols = {h: [r[k].strip() for r in rows] for k, h in enumerate(header)}
    return cols, names


def _factor(path: Path, name: str, values: list[str], declared: int | None):
    """One column -> (FactorInfo, labels (n,) int64); errors name line, column and value."""
    if all(_INT.match(v) for v in values):
        labels = np.array([int(v) for v in values], np.int64)
        neg = np.flatnonzero(labels < 0)
        if len(neg):
            i = int(neg[0])
            raise DataError(f"{path}: line {i + 2}, column {name!r}: negative label {values[i]!r}")
        classes = int(declared) if declared is not None else int(labels.max()) + 1
        over = np.flatnonzero(labels >= classes)
        if len(over):
            i = int(over[0])
            raise DataError(f"{path}: line {i + 2}, column {name!r}: label {values[i]!r} is outside "
                            f"the declared {classes} classes [0, {classes})")
        names = ()
    elif all(_is_number(v) for v in values):
        i = next(i for i, v in enumerate(values) if not _INT.match(v))
        raise DataError(f"{path}: line {i + 2}, column {name!r}: non-integer label {values[i]!r}")
    else:
        for i, v in enumerate(values):
            if v == "":
                raise DataError(f"{path}: line {i + 2}, column {name!r}: empty label")
        names = tuple(sorted(set(values)))
        labels = np.searchsorted(np.array(names, dtype=object), np.array(values, dtype=object))
        labels = np.asarray(labels, np.int64)
        classes = len(names)
        if declared is not None and int(declared) != classes:
            raise DataError(f"{path}: column {name!r} has {classes} distinct names {list(names)[:10]}, "
                            f"declared classes {declared}")
    if classes < 2 or len(np.unique(labels)) < 2:
        raise DataError(f"{path}: column {name!r} has a single class ({values[0]!r}); a factor needs "
                        f"at least 2 classes")
    return FactorInfo(name, classes, names), labels


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def plan(opts: dict) -> SourcePlan:
    if opts["root"] is None:
        raise DataError(f"{NAME}: option 'root' (the image folder) is required")
    root = Path(opts["root"])
    if not root.is_dir():
        raise DataError(f"{NAME}: folder {root} not found")
    csv_path = Path(opts["csv"]) if opts["csv"] else root / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"{NAME}: label CSV {csv_path} not found")
    declared = opts["factors"]
    if isinstance(declared, str):
        declared = [d.strip() for d in declared.split(",") if d.strip()]
    cols, names = _read_csv(csv_path, opts["file_column"], declared)
    classes = dict(opts["classes"] or {})
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise DataError(f"{NAME}: classes given for {unknown}, which are not factor columns {names}")
    factors, labels = [], []
    for name in names:
        f, lab = _factor(csv_path, name, cols[name], classes.get(name))
        factors.append(f)
        labels.append(lab)
    labels = np.stack(labels, 1)
    n = len(labels)
    if "split" in cols:
        bad = [i for i, v in enumerate(cols["split"]) if v not in ("train", "test")]
        if bad:
            i = bad[0]
            raise DataError(f"{csv_path}: line {i + 2}, column 'split': {cols['split'][i]!r} is not "
                            f"'train' or 'test'")
        is_test = np.array([v == "test" for v in cols["split"]])
    else:
        is_test = test_mask(n, float(opts["test_portion"]), int(opts["seed"]))
    for split, mask in (("train", ~is_test), ("test", is_test)):
        if not mask.any():
            raise DataError(f"{csv_path}: the {split} split is empty")
    files = [root / p for p in cols[opts["file_column"]]]
    for i, p in enumerate(files):
        if not p.is_file():
            raise DataError(f"{csv_path}: line {i + 2}, column {opts['file_column']!r}: file "
                            f"{p} not found")
    h, w, c = _images.peek(files[0])
    channels = int(opts["channels"] or c)
    if channels not in (1, 3):
        raise DataError(f"{NAME}: channels must be 1 or 3, got {channels}")
    native = h if h == w else None
    size = int(opts["image_size"] or native or 0)
    if not size:
        raise DataError(f"{NAME}: {files[0]} is {w}x{h}, not square: pass image_size and resize=True")
    if size % 2:
        raise DataError(f"{NAME}: image size {size} ({files[0]}) is odd; pass an even image_size "
                        f"and resize=True")
    tasks = [{"files": [str(p) for p in files[a:b]], "labels": labels[a:b], "test": is_test[a:b],
              "start": a, "size": size, "expect": (h, w, channels), "resize": bool(opts["resize"]),
              "csv": str(csv_path)}
             for a, b in ranges(n, int(opts["chunk_size"]))]
    fingerprint = {"csv": file_digest(csv_path), "images": tree_fingerprint(root, files)}
    return SourcePlan(NAME, factors, channels, size, native, tasks, read, opts, fingerprint)


def read(task: dict) -> Iterator[Chunk]:
    images = np.stack([
        _images.load(Path(p), task["expect"], task["size"], task["resize"],
                     where=f"{task['csv']}: line {task['start'] + i + 2}: ")
        for i, p in enumerate(task["files"])])
    yield Chunk(np.where(task["test"], TEST, TRAIN).astype(np.int8),
                task["start"] + np.arange(len(images), dtype=np.int64), images, task["labels"],
                task["csv"])
