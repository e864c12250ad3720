"""``svhn``: Street View House Numbers (cropped digits) from torchvision's layout.

Files ``ROOT/train_32x32.mat``, ``test_32x32.mat`` and (option ``extra``,
default on) ``extra_32x32.mat``, whose images join the training split.
``X`` is (32, 32, 3, N) uint8, ``y`` (N, 1) with label 10 for digit 0.
Pixels are streamed out of the .mat file (see ``_matfile``), one task per
file. Factor ``class`` (10); docs/method.md section 10.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from . import _matfile
from ._common import SourcePlan, Chunk, TEST, TRAIN, file_digest, require_file, torchvision_fetch_hint

NAME = "svhn"
FACTORS = [("class", 10)]
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 3
OPTIONS = {"root": None, "download": False, "extra": True}
FILES = [("train", "train_32x32.mat", TRAIN), ("test", "test_32x32.mat", TEST),
         ("extra", "extra_32x32.mat", TRAIN)]
ID_STRIDE = 10_000_000   # ids: file index * stride + row


def plan(opts: dict) -> SourcePlan:
    if opts["root"] is None:
        raise DataError(f"{NAME}: option 'root' (the torchvision data root) is required")
    root = Path(opts["root"])
    files = FILES if opts["extra"] else FILES[:2]
    if opts["download"]:
        import torchvision.datasets as tvd

        for split, _, _ in files:
            tvd.SVHN(str(root), split=split, download=True)
    hint = torchvision_fetch_hint(NAME, str(root))
    tasks, fingerprint = [], {}
    for k, (_, fname, split) in enumerate(files):
        path = require_file(root / fname, NAME, hint)
        dims = _matfile.array_shape(path, "X")
        if len(dims) != 4 or dims[:3] != (32, 32, 3):
            raise DataError(f"{NAME}: {path}: X has shape {dims}, expected (32, 32, 3, N)")
        fingerprint[fname] = file_digest(path)
        tasks.append({"path": str(path), "split": split, "file": k,
                      "chunk": int(opts["chunk_size"])})
    size = int(opts["image_size"] or DEFAULT_IMAGE_SIZE)
    return SourcePlan(NAME, [FactorInfo("class", 10, tuple(str(i) for i in range(10)))], CHANNELS,
                      size, DEFAULT_IMAGE_SIZE, tasks, read, opts, fingerprint)


def read(task: dict) -> Iterator[Chunk]:
    from scipy.io import loadmat

    path = task["path"]
    y = np.asarray(loadmat(path, variable_names=["y"])["y"]).reshape(-1).astype(np.int64)
    y = np.where(y == 10, 0, y)
    a = 0
    for block in _matfile.iter_last_axis(path, "X", task["chunk"]):
        k = len(block)
        if a + k > len(y):
            raise DataError(f"{NAME}: {path}: more images than the {len(y)} labels in 'y'")
        yield Chunk(np.full(k, task["split"], np.int8),
                    task["file"] * ID_STRIDE + np.arange(a, a + k, dtype=np.int64),
                    np.ascontiguousarray(block, dtype=np.uint8), y[a:a + k, None], path)
        a += k
