"""Shared reader for torchvision's MNIST-family layouts (MNIST, Fashion-MNIST).

torchvision keeps the extracted IDX files in ``ROOT/<ClassName>/raw/``; we
read them ourselves (memory-mapped, so tasks touch only their rows) and use
torchvision only to download when ``download`` is set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from ._common import SourcePlan, Chunk, file_digest, ranges, require_file, torchvision_fetch_hint
from ._idx import open_idx

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def family_plan(name: str, tv_class: str, class_names: tuple[str, ...], opts: dict) -> SourcePlan:
    if opts["root"] is None:
        raise DataError(f"{name}: option 'root' (the torchvision data root) is required")
    root = Path(opts["root"])
    if opts["download"]:
        import torchvision.datasets as tvd

        for train in (True, False):
            getattr(tvd, tv_class)(str(root), train=train, download=True)
    raw = root / tv_class / "raw"
    tasks, fingerprint, offset = [], {}, 0
    for split_code, split in enumerate(("train", "test")):
        img_path, lab_path = (require_file(raw / f, name, torchvision_fetch_hint(name, str(root)))
                              for f in FILES[split])
        images, labels = open_idx(img_path), open_idx(lab_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{name}: {img_path} has shape {images.shape} but {lab_path} has "
                            f"shape {labels.shape}; expected (N, H, W) images and (N,) labels")
        for p in (img_path, lab_path):
            fingerprint[p.name] = file_digest(p)
        for a, b in ranges(len(images), int(opts["chunk_size"])):
            tasks.append({"images": str(img_path), "labels": str(lab_path), "split": split_code,
                          "start": a, "stop": b, "id_offset": offset})
        offset += len(images)
        native = int(images.shape[1])
    size = int(opts["image_size"] or native)
    factors = [FactorInfo("class", 10, class_names)]
    return SourcePlan(name, factors, 1, size, native, tasks, read, opts, fingerprint)


def read(task: dict) -> Iterator[Chunk]:
    a, b = task["start"], task["stop"]
    images = np.asarray(open_idx(task["images"])[a:b], dtype=np.uint8)[..., None]
    labels = np.asarray(open_idx(task["labels"])[a:b], dtype=np.int64)[:, None]
    yield Chunk(np.full(b - a, task["split"], np.int8),
                np.arange(a, b, dtype=np.int64) + task["id_offset"], images, labels,
                task["images"])
