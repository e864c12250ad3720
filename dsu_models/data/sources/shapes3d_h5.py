"""``3dshapes``: the real 3D Shapes ``3dshapes.h5`` (option ``path``), 64x64 RGB.

Datasets ``images`` (480,000, 64, 64, 3) uint8 and ``labels`` (480,000, 6)
float64 factor values: floor_hue, wall_hue, object_hue (10 each, 0.0-0.9),
scale (8, 0.75-1.25), shape (4) and orientation (15, -30 to 30 degrees);
docs/method.md section 10. Values become class indices by rank among the distinct
values of their column (names keep the values). Images are read in slices
of ``chunk_size`` rows, never the whole array. ids are row numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from ._common import SourcePlan, Chunk, TEST, TRAIN, file_digest, ranges, test_mask

NAME = "3dshapes"
FACTORS = [("floor_hue", 10), ("wall_hue", 10), ("object_hue", 10), ("scale", 8),
           ("shape", 4), ("orientation", 15)]
DEFAULT_IMAGE_SIZE = 64
CHANNELS = 3
OPTIONS = {"path": None}
FETCH = ("Get 3dshapes.h5 from https://console.cloud.google.com/storage/browser/3d-shapes "
         "and pass --path FILE.")


def _values(path: Path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "images" not in f or "labels" not in f:
                raise DataError(f"{NAME}: {path} needs datasets 'images' and 'labels', has {list(f)}")
            shape = f["images"].shape
            values = np.asarray(f["labels"][()], dtype=np.float64)
    except OSError as e:
        raise DataError(f"{NAME}: cannot read {path} as HDF5: {e}") from e
    return shape, values


def plan(opts: dict) -> SourcePlan:
    if opts["path"] is None:
        raise DataError(f"{NAME}: option 'path' (3dshapes.h5) is required. {FETCH}")
    path = Path(opts["path"])
    if not path.is_file():
        raise DataError(f"{NAME}: {path} not found. {FETCH}")
    shape, values = _values(path)
    if len(shape) != 4 or shape[3] != 3 or values.shape != (shape[0], len(FACTORS)):
        raise DataError(f"{NAME}: {path}: images {shape}, labels {values.shape}; expected "
                        f"(N, H, W, 3) and (N, {len(FACTORS)})")
    factors, levels = [], []
    for j, (name, classes) in enumerate(FACTORS):
        lv = np.unique(np.round(values[:, j], 6))
        if len(lv) != classes:
            raise DataError(f"{NAME}: {path}: labels column {j} ({name}) has {len(lv)} distinct "
                            f"values {lv[:20].tolist()}, expected {classes}")
        levels.append(lv)
        factors.append(FactorInfo(name, classes, tuple(f"{v:g}" for v in lv)))
    is_test = test_mask(shape[0], float(opts["test_portion"]), int(opts["seed"]))
    tasks = [{"path": str(path), "start": a, "stop": b, "test": is_test[a:b], "levels": levels}
             for a, b in ranges(shape[0], int(opts["chunk_size"]))]
    native = int(shape[1])
    return SourcePlan(NAME, factors, CHANNELS, int(opts["image_size"] or native), native, tasks,
                      read, opts, {path.name: file_digest(path)})


def read(task: dict) -> Iterator[Chunk]:
    import h5py

    a, b = task["start"], task["stop"]
    with h5py.File(task["path"], "r") as f:
        images = np.asarray(f["images"][a:b], dtype=np.uint8)
        values = np.round(np.asarray(f["labels"][a:b], dtype=np.float64), 6)
    labels = np.stack([np.searchsorted(lv, values[:, j]) for j, lv in enumerate(task["levels"])], 1)
    yield Chunk(np.where(task["test"], TEST, TRAIN).astype(np.int8),
                np.arange(a, b, dtype=np.int64), images, labels.astype(np.int64), task["path"])
