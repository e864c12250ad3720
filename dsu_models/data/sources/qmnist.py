"""``qmnist``: the NIST part of QMNIST (402,953 digits) with writer ids.

Files ``ROOT/QMNIST/raw/xnist-images-idx3-ubyte`` and
``xnist-labels-idx2-int`` (torchvision's layout after download). The label
file holds 8 int32 columns per image: digit class, NIST HSF series, writer id,
digit index for that writer, NIST class code, global NIST index, duplicate
flag, unused. Factors (docs/method.md section 10): ``class`` (10) and ``writer``
(the distinct writer ids, renumbered 0..W-1 in increasing id order; class
names keep the original ids). No standard split: a seeded ``test_portion``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from ._common import (SourcePlan, Chunk, TEST, TRAIN, file_digest, ranges, require_file,
                      test_mask, torchvision_fetch_hint)
from ._idx import open_idx

NAME = "qmnist"
FACTORS = [("class", 10), ("writer", None)]   # writer count comes from the data
DEFAULT_IMAGE_SIZE = 28
CHANNELS = 1
OPTIONS = {"root": None, "download": False}
IMAGES, LABELS = "xnist-images-idx3-ubyte", "xnist-labels-idx2-int"


def plan(opts: dict) -> SourcePlan:
    if opts["root"] is None:
        raise DataError(f"{NAME}: option 'root' (the torchvision data root) is required")
    root = Path(opts["root"])
    if opts["download"]:
        import torchvision.datasets as tvd

        tvd.QMNIST(str(root), what="nist", download=True)
    raw = root / "QMNIST" / "raw"
    hint = torchvision_fetch_hint(NAME, str(root))
    img_path, lab_path = require_file(raw / IMAGES, NAME, hint), require_file(raw / LABELS, NAME, hint)
    images, labels = open_idx(img_path), open_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 2 or labels.shape[1] < 3 or len(images) != len(labels):
        raise DataError(f"{NAME}: {img_path} has shape {images.shape} and {lab_path} shape "
                        f"{labels.shape}; expected (N, H, W) and (N, 8)")
    writers = np.unique(np.asarray(labels[:, 2]))
    if len(writers) < 2:
        raise DataError(f"{NAME}: {lab_path} column 2 (writer) has a single value {writers}")
    factors = [FactorInfo("class", 10, tuple(str(i) for i in range(10))),
               FactorInfo("writer", len(writers), tuple(str(int(w)) for w in writers))]
    is_test = test_mask(len(images), float(opts["test_portion"]), int(opts["seed"]))
    tasks = [{"images": str(img_path), "labels": str(lab_path), "start": a, "stop": b,
              "test": is_test[a:b], "writers": writers}
             for a, b in ranges(len(images), int(opts["chunk_size"]))]
    native = int(images.shape[1])
    return SourcePlan(NAME, factors, CHANNELS, int(opts["image_size"] or native), native, tasks,
                      read, opts, {IMAGES: file_digest(img_path), LABELS: file_digest(lab_path)})


def read(task: dict) -> Iterator[Chunk]:
    a, b = task["start"], task["stop"]
    images = np.asarray(open_idx(task["images"])[a:b], dtype=np.uint8)[..., None]
    raw = np.asarray(open_idx(task["labels"])[a:b], dtype=np.int64)
    labels = np.stack([raw[:, 0], np.searchsorted(task["writers"], raw[:, 2])], 1)
    yield Chunk(np.where(task["test"], TEST, TRAIN).astype(np.int8),
                np.arange(a, b, dtype=np.int64), images, labels, task["images"])
