"""``cifar10``: torchvision CIFAR-10 from ``ROOT/cifar-10-batches-py``, factor ``class``.

Five pickled training batches and one test batch of 10,000 32x32 RGB images
each (``data``: (10000, 3072) uint8, channel-major; ``labels``); one task per
batch file. docs/method.md section 10.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from ._common import SourcePlan, Chunk, TEST, TRAIN, file_digest, require_file, torchvision_fetch_hint

NAME = "cifar10"
FACTORS = [("class", 10)]
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 3
OPTIONS = {"root": None, "download": False}
FOLDER = "cifar-10-batches-py"
BATCHES = [(f"data_batch_{i}", TRAIN) for i in range(1, 6)] + [("test_batch", TEST)]
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def plan(opts: dict) -> SourcePlan:
    if opts["root"] is None:
        raise DataError(f"{NAME}: option 'root' (the torchvision data root) is required")
    root = Path(opts["root"])
    if opts["download"]:
        import torchvision.datasets as tvd

        tvd.CIFAR10(str(root), train=True, download=True)
    hint = torchvision_fetch_hint(NAME, str(root))
    tasks, fingerprint = [], {}
    for k, (fname, split) in enumerate(BATCHES):
        path = require_file(root / FOLDER / fname, NAME, hint)
        fingerprint[fname] = file_digest(path)
        tasks.append({"path": str(path), "split": split, "batch": k})
    size = int(opts["image_size"] or DEFAULT_IMAGE_SIZE)
    return SourcePlan(NAME, [FactorInfo("class", 10, CLASS_NAMES)], CHANNELS, size,
                      DEFAULT_IMAGE_SIZE, tasks, read, opts, fingerprint)


def read(task: dict) -> Iterator[Chunk]:
    path = task["path"]
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)[:, None]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{NAME}: cannot read CIFAR-10 batch {path}: {e!r}") from e
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{NAME}: {path}: data shape {data.shape}, {len(labels)} labels; "
                        f"expected (N, 3072) and N labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    ids = task["batch"] * 10_000 + np.arange(len(images), dtype=np.int64)
    yield Chunk(np.full(len(images), task["split"], np.int8), ids, images, labels, path)
