"""Registry of data sources: name -> module (docs/method.md section 10 defaults).

Each module defines ``NAME``, ``FACTORS`` (name, classes; None where the data
decide), ``DEFAULT_IMAGE_SIZE``, ``CHANNELS``, ``OPTIONS`` (its own options and
defaults) and ``plan(options) -> SourcePlan`` whose tasks ``read`` in chunks.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import DataError
from ._common import COMMON_OPTIONS, Chunk, SourcePlan, resolve_options
from . import (chairs3d, cifar10, digits, dsprites, fashion_mnist, image_folder, mnist, qmnist,
               shapes3d, shapes3d_h5, sprites, sprites_full, svhn)

SOURCES: dict[str, ModuleType] = {m.NAME: m for m in (
    shapes3d, sprites, sprites_full, digits, mnist, fashion_mnist, qmnist, svhn, cifar10, dsprites,
    shapes3d_h5, chairs3d, image_folder)}

__all__ = ["SOURCES", "get_source", "make_plan", "Chunk", "SourcePlan", "COMMON_OPTIONS"]


def get_source(name: str) -> ModuleType:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"unknown data source {name!r}; known: {sorted(SOURCES)}") from None


def make_plan(name: str, options: dict) -> SourcePlan:
    """Validate ``options`` for source ``name`` and plan its preparation."""
    module = get_source(name)
    return module.plan(resolve_options(name, module.OPTIONS, options))
