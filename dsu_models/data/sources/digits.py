"""``digits``: scikit-learn's bundled handwritten digits (real data).

1,797 grayscale 8x8 images with 17 gray levels (0-16), factor ``class`` (10).
Levels are scaled to 0-255 and the images upscaled bilinearly (vectorised,
torch) to ``image_size`` (default 32). No standard split: a seeded
``test_portion`` is held out.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ._common import SourcePlan, Chunk, TEST, TRAIN, test_mask

NAME = "digits"
FACTORS = [("class", 10)]
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 1
OPTIONS: dict = {}


def load(size: int) -> tuple[np.ndarray, np.ndarray]:
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
    task = {"size": size, "test_portion": float(opts["test_portion"]), "seed": int(opts["seed"])}
    factors = [FactorInfo("class", 10, tuple(str(i) for i in range(10)))]
    return SourcePlan(NAME, factors, CHANNELS, size, size, [task], read, opts,
                      {"data": "sklearn.datasets.load_digits"})


def read(task: dict) -> Iterator[Chunk]:
    images, labels = load(task["size"])
    is_test = test_mask(len(images), task["test_portion"], task["seed"])
    yield Chunk(np.where(is_test, TEST, TRAIN).astype(np.int8),
                np.arange(len(images), dtype=np.int64), images, labels)
