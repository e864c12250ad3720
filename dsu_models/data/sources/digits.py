"""``digits``: scikit-learn's bundled handwritten digits (real data).

1,797 grayscale 8x8 images with 17 gray levels (0-16), factor ``class`` (10).
Levels are scaled to 0-255 and the images upscaled bilinearly (vectorised,
torch) to ``image_size`` (default 32). ``num_samples`` keeps a seeded subset
without repetition (None: all of them). No standard split: a seeded
``test_portion`` of the kept images is held out.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from ._common import SourcePlan, Chunk, TEST, TRAIN, test_mask

NAME = "digits"
FACTORS = [("class", 10)]
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 1
OPTIONS = {"num_samples": None}   # None = all of them
IN_MEMORY = True                  # load_builtin draws it; no files to prepare
DEFAULT_SAMPLES = None            # a config with num_samples: null draws all of them
IMAGES = 1797                     # sklearn's bundled set; fixed


def all_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images (N, size, size, 1) uint8, labels (N, 1) int64."""
    import torch  # here: the sources package stays torch-free to import (see ..base)
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    img = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return img, d.target.astype(np.int64)[:, None]


def plan(opts: dict) -> SourcePlan:
    size = int(opts["image_size"] or DEFAULT_IMAGE_SIZE)
    n = opts["num_samples"]
    if n is not None and not 1 <= int(n) <= IMAGES:
        raise DataError(f"digits: num_samples must be in [1, {IMAGES}], got {n}")
    task = {"size": size, "num_samples": None if n is None else int(n),
            "test_portion": float(opts["test_portion"]), "seed": int(opts["seed"])}
    factors = [FactorInfo("class", 10, tuple(str(i) for i in range(10)))]
    # all images hash as before num_samples existed, so earlier preparations stay recognised
    hashed = {k: v for k, v in opts.items() if not (k == "num_samples" and v is None)}
    return SourcePlan(NAME, factors, CHANNELS, size, size, [task], read, hashed,
                      {"data": "sklearn.datasets.load_digits"})


def read(task: dict) -> Iterator[Chunk]:
    """All the digits, or the task's seeded subset (ids: rows of sklearn's set), one chunk."""
    images, labels = all_digits(task["size"])
    ids = np.arange(len(images), dtype=np.int64)
    n, seed = task["num_samples"], task["seed"]
    if n is not None:
        keep = np.sort(np.random.default_rng([seed, 0x6121D]).choice(len(ids), n, replace=False))
        ids, images, labels = ids[keep], images[keep], labels[keep]
    is_test = test_mask(len(ids), task["test_portion"], seed)
    yield Chunk(np.where(is_test, TEST, TRAIN).astype(np.int8), ids, images, labels)
