"""``fashion_mnist``: torchvision FashionMNIST from ``ROOT/FashionMNIST/raw``, factor ``class``.

28x28 grayscale; standard train (60,000) / test (10,000) split; docs/method.md section 10.
"""
from __future__ import annotations

from ._mnist_family import family_plan

NAME = "fashion_mnist"
FACTORS = [("class", 10)]
DEFAULT_IMAGE_SIZE = 28
CHANNELS = 1
OPTIONS = {"root": None, "download": False}
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")


def plan(opts):
    return family_plan(NAME, "FashionMNIST", CLASS_NAMES, opts)
