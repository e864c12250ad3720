"""``mnist``: torchvision MNIST from a local root (``ROOT/MNIST/raw``), factor ``class``.

28x28 grayscale; standard train (60,000) / test (10,000) split; docs/method.md section 10.
"""
from __future__ import annotations

from ._mnist_family import family_plan

NAME = "mnist"
FACTORS = [("class", 10)]
DEFAULT_IMAGE_SIZE = 28
CHANNELS = 1
OPTIONS = {"root": None, "download": False}


def plan(opts):
    return family_plan(NAME, "MNIST", tuple(str(i) for i in range(10)), opts)
