"""``dsprites``: the real dSprites ``.npz`` (option ``path``), 64x64 binary sprites.

Arrays: ``imgs`` (737,280, 64, 64) uint8 in {0, 1} and ``latents_classes``
(N, 6): color (always 0), shape (3), scale (6), orientation (40), x, y (32).
docs/method.md section 10 quirks: orientation 39 equals orientation 0 and is
dropped (39 orientations, 718,848 images); with ``relabel_orientation`` the
square's and ellipse's labels t become (4t) % 39 and (2t) % 39 so they go round
in order through their symmetric poses. ids are the row numbers in the file.

The ``.npz`` is a zip of ``.npy`` files, usually deflated, so it cannot be
memory-mapped: each task streams ``imgs.npy`` from the zip, skipping (and
discarding) the rows before its range; memory stays at one chunk.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from ._common import SourcePlan, Chunk, TEST, TRAIN, file_digest, ranges, test_mask

NAME = "dsprites"
FACTORS = [("shape", 3), ("scale", 6), ("orientation", 39), ("x", 32), ("y", 32)]
DEFAULT_IMAGE_SIZE = 64
CHANNELS = 1
OPTIONS = {"path": None, "relabel_orientation": False}
FETCH = ("Get dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz from "
         "https://github.com/google-deepmind/dsprites-dataset and pass --path FILE.")
SQUARE, ELLIPSE = 0, 1
STREAM_TASKS = 16   # few long tasks: each must decompress (and drop) the rows before its range


def _open_member(zf: zipfile.ZipFile, key: str, path: Path):
    try:
        f = zf.open(key + ".npy")
    except KeyError as e:
        raise DataError(f"{NAME}: {path} has no array {key!r} (has {zf.namelist()})") from e
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if fortran:
        raise DataError(f"{NAME}: {path}: array {key!r} is in Fortran order; expected C order")
    return f, shape, dtype


def _latents(path: Path) -> np.ndarray:
    with np.load(path) as z:
        if "latents_classes" not in z:
            raise DataError(f"{NAME}: {path} has no array 'latents_classes' (has {list(z.keys())})")
        return np.asarray(z["latents_classes"], dtype=np.int64)


def plan(opts: dict) -> SourcePlan:
    if opts["path"] is None:
        raise DataError(f"{NAME}: option 'path' (the dSprites .npz) is required. {FETCH}")
    path = Path(opts["path"])
    if not path.is_file():
        raise DataError(f"{NAME}: {path} not found. {FETCH}")
    latents = _latents(path)
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_member(zf, "imgs", path)
        f.close()
    if len(shape) != 3 or latents.shape != (shape[0], 6):
        raise DataError(f"{NAME}: {path}: imgs {shape} and latents_classes {latents.shape} "
                        f"do not match (expected (N, H, W) and (N, 6))")
    keep_n = int((latents[:, 3] != 39).sum())
    is_test = test_mask(keep_n, float(opts["test_portion"]), int(opts["seed"]))
    # tasks cover file rows [a, b); their kept rows take consecutive positions in the split mask
    tasks, pos = [], 0
    span = max(int(opts["chunk_size"]), -(-shape[0] // STREAM_TASKS))
    for a, b in ranges(shape[0], span):
        k = int((latents[a:b, 3] != 39).sum())
        tasks.append({"path": str(path), "start": a, "stop": b, "test": is_test[pos:pos + k],
                      "relabel": bool(opts["relabel_orientation"]), "chunk": int(opts["chunk_size"])})
        pos += k
    factors = [FactorInfo(n, c) for n, c in FACTORS]
    native = int(shape[1])
    return SourcePlan(NAME, factors, CHANNELS, int(opts["image_size"] or native), native, tasks,
                      read, opts, {path.name: file_digest(path)})


def relabel_orientation(labels: np.ndarray) -> np.ndarray:
    """labels (n, 5) shape, scale, orientation, x, y -> orientation relabelled (copy)."""
    out = labels.copy()
    t = labels[:, 2]
    out[:, 2] = np.where(labels[:, 0] == SQUARE, (4 * t) % 39,
                         np.where(labels[:, 0] == ELLIPSE, (2 * t) % 39, t))
    return out


def read(task: dict) -> Iterator[Chunk]:
    path, a, b = Path(task["path"]), task["start"], task["stop"]
    latents = _latents(path)[a:b, 1:]
    keep = latents[:, 2] != 39
    pos = np.cumsum(keep) - keep                       # position of each kept row in task["test"]
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_member(zf, "imgs", path)
        with f:
            per = int(np.prod(shape[1:])) * dtype.itemsize
            skip = a * per
            while skip:                      # deflate streams cannot seek: read and discard
                got = len(f.read(min(skip, 1 << 24)))
                if not got:
                    raise DataError(f"{NAME}: {path}: imgs.npy is truncated before row {a}")
                skip -= got
            for c0 in range(0, b - a, task["chunk"]):
                c1 = min(c0 + task["chunk"], b - a)
                raw = f.read((c1 - c0) * per)
                if len(raw) != (c1 - c0) * per:
                    raise DataError(f"{NAME}: {path}: imgs.npy is truncated (rows {a + c0}..{a + c1})")
                k = keep[c0:c1]
                images = np.frombuffer(raw, dtype).reshape((c1 - c0,) + tuple(shape[1:]))[k]
                labels = latents[c0:c1][k]
                if task["relabel"]:
                    labels = relabel_orientation(labels)
                yield Chunk(np.where(task["test"][pos[c0:c1][k]], TEST, TRAIN).astype(np.int8),
                            np.arange(a + c0, a + c1, dtype=np.int64)[k],
                            np.where(images > 0, 255, 0).astype(np.uint8)[..., None], labels, str(path))
