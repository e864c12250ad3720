"""``image_folder``: any folder of images plus a CSV of labels.

The CSV (option ``csv``, default ``ROOT/labels.csv``) has a file column
(``file_column``, default ``file``, paths relative to ROOT), one column per
factor and optionally a ``split`` column (``train`` / ``val`` / ``test``;
without one a seeded ``test_portion`` is held out for test). When the CSV
names ``val`` rows, they are the validation split as given; otherwise
validation rows are carved from train by id (``val_portion``, see
``dsu_models/data/splits.py``). Columns named in ``eval_factors`` are
evaluation-only factors: stored like the others, but a cell may be empty
(stored as label -1) and training never reads them; every other factor cell
must hold a label. A factor column holds either
non-negative integers (classes 0..max, or ``classes[name]`` if declared) or
strings (class ids by sorted name; the names are kept), never a mix of the
two; integer labels may not imply more than ``max(1024, 10 x rows)`` classes
(a typo such as ``1000000`` is an error, not a million-class factor). Each
image is listed once (``./a.png`` and ``a.png`` are the same image), inside
ROOT. Blank lines are skipped; errors name the CSV's own line numbers. Declaring
``factors`` makes missing and extra columns errors. Every image must have the
first image's size and channel count unless ``resize`` is set, which converts
channels and resizes to ``image_size``. A non-square image is refused unless
``square`` says how to make it square: ``"crop"`` keeps the centred square,
``"pad"`` pads the short side with black (``codec.square_image``; flag
``--square crop|pad``; chairs3d's ``crop`` is another option, a framing
fraction). Transparent pixels are composited onto white, and the preparation
notes how many images had them and the first (manifest ``notes``, printed by
``prepare_data.py``). ids are CSV data-row numbers (0-based).
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..codec import SQUARE_HINT, SQUARE_MODES
from ..errors import DataError
from . import _images
from ..base import MISSING
from ._common import (SPLIT_CODES, TEST, TRAIN, VAL, Chunk, SourcePlan, file_digest, ranges,
                      test_mask, tree_fingerprint)

NAME = "image_folder"
FACTORS: list = []          # from the CSV
DEFAULT_IMAGE_SIZE = None   # the images' own size
CHANNELS = None             # the images' own channel count
OPTIONS = {"root": None, "csv": None, "file_column": "file", "factors": None, "classes": None,
           "channels": None, "eval_factors": None, "square": None}
FLATTENED = "had transparent pixels; composited onto white"   # a Chunk note (prepared.finish)
_INT = re.compile(r"^[+-]?[0-9]+$")
_RESERVED = ("id", "image")          # columns of the prepared format itself (prepared._schema)
# an integer factor column may not imply more classes than this (a typo such as
# 1000000 would otherwise allocate and write a class table that size)
MIN_CLASS_LIMIT, CLASSES_PER_ROW = 1024, 10


def class_limit(rows: int) -> int:
    """Most classes an integer factor may have in a CSV of ``rows`` data rows."""
    return max(MIN_CLASS_LIMIT, CLASSES_PER_ROW * rows)


def _read_csv(path: Path, file_col: str, declared: list[str] | None):
    """-> (columns {header: [cell, ...]}, factor names, CSV line number of each data row).

    Blank lines are skipped; line numbers are those of the file (1-based)."""
    rows, lines = [], []
    header = header_line = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            prev = 0
            for r in reader:
                start, prev = prev + 1, reader.line_num
                if not any(c.strip() for c in r):
                    continue
                if header is None:
                    header, header_line = [h.strip() for h in r], start
                else:
                    rows.append(r)
                    lines.append(start)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read CSV {path}: {e}") from e
    if header is None:
        raise DataError(f"{path}: empty CSV (no header)")
    where = f"{path}: line {header_line}"
    for k, h in enumerate(header):
        if not h:
            raise DataError(f"{where}: column {k + 1} of the header is empty; header is {header}")
        if header.index(h) != k:
            raise DataError(f"{where}: column {h!r} appears twice in the header {header}")
    if file_col not in header:
        raise DataError(f"{where}: missing file column {file_col!r}; header is {header}")
    names = [h for h in header if h not in (file_col, "split")]
    if declared is not None:
        missing = [d for d in declared if d not in names]
        extra = [h for h in names if h not in declared]
        if missing:
            raise DataError(f"{where}: missing factor column(s) {missing}; header is {header}")
        if extra:
            raise DataError(f"{where}: unexpected column(s) {extra} (declared factors {declared}); "
                            f"header is {header}")
        names = list(declared)
    if not names:
        raise DataError(f"{where}: no factor columns besides {file_col!r}; header is {header}")
    for h in names:
        if h in _RESERVED:
            raise DataError(f"{where}: column {h!r} is reserved by the prepared format (its columns "
                            f"{list(_RESERVED)}); rename that factor column")
    for r, line in zip(rows, lines):
        if len(r) != len(header):
            raise DataError(f"{path}: line {line} has {len(r)} fields, header has {len(header)}")
    if not rows:
        raise DataError(f"{path}: no data rows")
    cols = {h: [r[k].strip() for r in rows] for k, h in enumerate(header)}
    return cols, names, lines


def _not_utf8(path: Path) -> DataError:
    """Where a CSV stops being UTF-8: its line, and the column the byte is in
    (the decoder's own offset counts from the start of a buffer, not the file)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return DataError(f"{path}: not UTF-8 text")   # not reached: the reader failed on it
    except UnicodeDecodeError as e:
        at = e.start
    start = data.rfind(b"\n", 0, at) + 1
    line = data.count(b"\n", 0, at) + 1
    lines = data.decode("utf-8", "replace").lstrip("\ufeff").splitlines()
    header_line = next((k + 1 for k, t in enumerate(lines) if t.strip(" ,\t")), line)
    header = next(csv.reader([lines[header_line - 1]]), []) if header_line < line else []
    field = len(next(csv.reader([data[start:at].decode("utf-8", "replace")]), [""]))
    column = (f", column {header[field - 1].strip()!r}" if field <= len(header)
              else f", field {field}")
    return DataError(f"{path}: line {line}{column}: not UTF-8 text (byte {data[at:at + 1]!r} "
                     f"at offset {at}); save the CSV as UTF-8")


def _declared_classes(path: Path, name: str, declared, rows: int) -> int | None:
    if declared is None:
        return None
    try:
        if isinstance(declared, bool) or int(declared) != float(declared):
            raise ValueError
        declared = int(declared)
    except (TypeError, ValueError):
        raise DataError(f"{path}: classes[{name!r}] must be an integer >= 2, "
                        f"got {declared!r}") from None
    if declared < 2:
        raise DataError(f"{path}: classes[{name!r}] must be an integer >= 2, got {declared}")
    limit = class_limit(rows)
    if declared > limit:
        raise DataError(f"{path}: classes[{name!r}] = {declared} is far more than the {rows} rows; "
                        f"at most max({MIN_CLASS_LIMIT}, {CLASSES_PER_ROW} x rows) = {limit} "
                        f"classes are allowed")
    return declared


def _factor(path: Path, name: str, values: list[str], declared, lines: list[int],
            eval_only: bool = False):
    """One column -> (FactorInfo, labels (n,) int64); errors name line, column and value.

    ``eval_only``: empty cells are allowed and become MISSING (-1); classes
    come from the labeled cells."""
    rows = len(values)
    declared = _declared_classes(path, name, declared, rows)
    labeled = [i for i, v in enumerate(values) if v != ""]
    if not eval_only and len(labeled) < rows:
        i = next(i for i, v in enumerate(values) if v == "")
        raise DataError(f"{path}: line {lines[i]}, column {name!r}: empty label (only columns "
                        f"named in eval_factors may have empty cells)")
    if not labeled:
        raise DataError(f"{path}: column {name!r} (evaluation-only) has no labels at all")
    info, some = _labels(path, name, [values[i] for i in labeled], declared,
                         [lines[i] for i in labeled], rows)
    out = np.full(rows, MISSING, np.int64)
    out[labeled] = some
    return dataclasses.replace(info, eval_only=eval_only), out


def _labels(path: Path, name: str, values: list[str], declared: int | None, lines: list[int],
            rows: int):
    """Non-empty cells -> (FactorInfo, labels (n,) int64); ``rows``: the CSV's data rows."""
    def where(i: int) -> str:
        return f"{path}: line {lines[i]}, column {name!r}"

    n = len(values)
    is_int = [bool(_INT.match(v)) for v in values]
    if all(is_int):
        ints = [int(v) for v in values]     # Python ints: no overflow before the checks below
        i = min(range(n), key=ints.__getitem__)
        if ints[i] < 0:
            raise DataError(f"{where(i)}: negative label {values[i]!r}")
        i = max(range(n), key=ints.__getitem__)
        limit = class_limit(rows)
        if declared is None and ints[i] + 1 > limit:
            raise DataError(f"{where(i)}: label {values[i]!r} means {ints[i] + 1} classes for {rows} "
                            f"rows; at most max({MIN_CLASS_LIMIT}, {CLASSES_PER_ROW} x rows) = "
                            f"{limit} classes are allowed (integer labels are class ids "
                            f"0..classes-1; use names for other codes)")
        classes = declared if declared is not None else ints[i] + 1
        if ints[i] >= classes:
            i = next(k for k, x in enumerate(ints) if x >= classes)
            raise DataError(f"{where(i)}: label {values[i]!r} is outside "
                            f"the declared {classes} classes [0, {classes})")
        labels = np.array(ints, np.int64)
        names = ()
    elif all(_is_number(v) for v in values):
        i = is_int.index(False)
        raise DataError(f"{where(i)}: non-integer label {values[i]!r}")
    elif any(is_int):
        first_int, first_name = is_int.index(True), is_int.index(False)
        mix = ("the column mixes integer labels and names; use integers (class ids) or names "
               "throughout")
        if 2 * sum(is_int) >= n:
            i = first_name
            raise DataError(f"{where(i)}: {values[i]!r} is not an integer, but line "
                            f"{lines[first_int]} has the integer {values[first_int]!r}: {mix}")
        i = first_int
        raise DataError(f"{where(i)}: {values[i]!r} is an integer, but line {lines[first_name]} "
                        f"has the name {values[first_name]!r}: {mix}")
    else:
        names = tuple(sorted(set(values)))
        labels = np.searchsorted(np.array(names, dtype=object), np.array(values, dtype=object))
        labels = np.asarray(labels, np.int64)
        classes = len(names)
        if declared is not None and declared != classes:
            raise DataError(f"{path}: column {name!r} has {classes} distinct names {list(names)[:10]}, "
                            f"declared classes {declared}")
    if classes < 2 or len(np.unique(labels)) < 2:
        raise DataError(f"{path}: column {name!r} has a single class ({values[0]!r}); a factor needs "
                        f"at least 2 classes")
    return FactorInfo(name, classes, names), labels


def _names_option(value) -> list[str]:
    """A list of column names given as a list or as one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [d.strip() for d in value.split(",") if d.strip()]
    return [str(d) for d in value]


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _image_paths(csv_path: Path, root: Path, col: str, cells: list[str], lines: list[int],
                 split: list[str] | None) -> list[Path]:
    """File cells -> paths under ``root``; each image once, inside the folder, existing."""
    seen: dict[str, int] = {}
    paths = []
    for i, cell in enumerate(cells):
        where = f"{csv_path}: line {lines[i]}, column {col!r}"
        if not cell:
            raise DataError(f"{where}: empty file name")
        rel = os.path.relpath(os.path.normpath(os.path.join(root, cell)), root)
        if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise DataError(f"{where}: {cell!r} is outside the folder {root}; paths must be "
                            f"relative to it")
        if rel in seen:
            k = seen[rel]
            if split is not None and split[k] != split[i]:
                raise DataError(f"{where}: {cell!r} is in the {split[i]} split here and in the "
                                f"{split[k]} split on line {lines[k]}; an image may be in one split "
                                f"only")
            raise DataError(f"{where}: {cell!r} is already listed on line {lines[k]}; each image "
                            f"may appear once")
        seen[rel] = i
        paths.append(root / rel)
    for i, p in enumerate(paths):
        if not p.is_file():
            raise DataError(f"{csv_path}: line {lines[i]}, column {col!r}: file {p} not found")
    return paths


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
    if declared is not None:
        declared = _names_option(declared)
    file_col = opts["file_column"]
    cols, names, lines = _read_csv(csv_path, file_col, declared)
    classes = dict(opts["classes"] or {})
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise DataError(f"{NAME}: classes given for {unknown}, which are not factor columns {names}")
    evals = _names_option(opts["eval_factors"])
    unknown = [e for e in evals if e not in names]
    if unknown:
        raise DataError(f"{NAME}: eval_factors {unknown} are not factor columns {names}")
    # one spelling in the manifest and the content hash, however the option was given
    opts = {**opts, "eval_factors": evals or None}
    if opts["square"] is None:    # unset: the content hash of earlier preparations is unchanged
        opts = {k: v for k, v in opts.items() if k != "square"}
    elif opts["square"] not in SQUARE_MODES:
        raise DataError(f"{NAME}: square must be one of {', '.join(SQUARE_MODES)}, got "
                        f"{opts['square']!r} (crop: keep the centred square; pad: pad with black)")
    square = opts.get("square")
    split = cols.get("split")
    if split is not None:
        for i, v in enumerate(split):
            if v not in SPLIT_CODES:
                raise DataError(f"{csv_path}: line {lines[i]}, column 'split': {v!r} is not one of "
                                f"{', '.join(repr(k) for k in SPLIT_CODES)}")
    files = _image_paths(csv_path, root, file_col, cols[file_col], lines, split)
    factors, labels = [], []
    for name in names:
        f, lab = _factor(csv_path, name, cols[name], classes.get(name), lines, name in evals)
        factors.append(f)
        labels.append(lab)
    labels = np.stack(labels, 1)
    n = len(labels)
    if split is not None:
        codes = np.array([SPLIT_CODES[v] for v in split], np.int8)
    else:
        codes = np.where(test_mask(n, float(opts["test_portion"]), int(opts["seed"])), TEST, TRAIN)
    for s in ("train", "test"):
        if not (codes == SPLIT_CODES[s]).any():
            raise DataError(f"{csv_path}: the {s} split is empty")
    # val rows in the CSV are the validation split as given; otherwise it is carved from train
    val_from = "csv" if (codes == VAL).any() else "carved"
    first = f"{csv_path}: line {lines[0]}"
    try:
        h, w, c = _images.peek(files[0])
    except DataError as e:
        raise DataError(f"{first}: {e}") from None
    channels = int(opts["channels"] or c)
    if channels not in (1, 3):
        raise DataError(f"{NAME}: channels must be 1 or 3, got {channels}")
    if h != w and square is None:
        raise DataError(f"{first}: {files[0]} is {w}x{h}, not square: pass {SQUARE_HINT}")
    native = {None: h, "crop": min(h, w), "pad": max(h, w)}[square]
    size = int(opts["image_size"] or native)
    if size % 2:
        raise DataError(f"{first}: image size {size} ({files[0]}) is odd; pass an even image_size "
                        f"and resize=True (--image-size, --resize)")
    tasks = [{"files": [str(p) for p in files[a:b]], "labels": labels[a:b], "split": codes[a:b],
              "start": a, "lines": lines[a:b], "size": size, "expect": (h, w, channels),
              "resize": bool(opts["resize"]), "csv": str(csv_path), "square": square}
             for a, b in ranges(n, int(opts["chunk_size"]))]
    fingerprint = {"csv": file_digest(csv_path), "images": tree_fingerprint(root, files)}
    return SourcePlan(NAME, factors, channels, size, native, tasks, read, opts, fingerprint,
                      val_from)


def read(task: dict) -> Iterator[Chunk]:
    flattened: list[str] = []
    images = np.stack([
        _images.load_image(Path(p), task["expect"], task["size"], task["resize"],
                           where=f"{task['csv']}: line {line}: ", square=task["square"],
                           flattened=flattened)
        for p, line in zip(task["files"], task["lines"])])
    yield Chunk(np.asarray(task["split"], np.int8),
                task["start"] + np.arange(len(images), dtype=np.int64), images, task["labels"],
                task["csv"], {FLATTENED: flattened} if flattened else {})
