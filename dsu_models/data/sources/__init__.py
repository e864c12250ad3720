"""Registry of data sources: name -> module (docs/method.md section 10 defaults).

Every module of this package is a source, except ``_``-prefixed helpers and
``builtin``: adding the file registers it under its ``NAME``. Each defines
``NAME``, ``FACTORS`` (name, classes; None where the data decide),
``DEFAULT_IMAGE_SIZE``, ``CHANNELS`` (None where the data decide), ``OPTIONS``
(its own options and defaults) and ``plan(options) -> SourcePlan`` whose tasks
``read`` in chunks. A source generated in memory (``builtin.load_builtin``)
also sets ``IN_MEMORY = True`` and ``DEFAULT_SAMPLES`` (what ``num_samples:
null`` draws; None = all). These attributes are the one declaration of a
dataset's table: ``dsu_models.config.dataset_defaults`` fills the config from them.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import DataError
from ._common import COMMON_OPTIONS, Chunk, SourcePlan, resolve_options

REQUIRED = ("NAME", "FACTORS", "DEFAULT_IMAGE_SIZE", "CHANNELS", "OPTIONS", "plan")
NOT_SOURCES = ("builtin",)   # the in-memory loader, built on the sources


def _discover() -> dict[str, ModuleType]:
    """Every source module of this package by ``NAME``, sorted by name; a module
    lacking a required attribute, or a repeated NAME, fails at import."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in NOT_SOURCES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [a for a in REQUIRED if not hasattr(module, a)]
        if missing:
            raise ImportError(f"{module.__name__}: a data source module must define {missing}")
        if module.NAME in found:
            raise ImportError(f"{module.__name__}: source name {module.NAME!r} is already "
                              f"taken by {found[module.NAME].__name__}")
        found[module.NAME] = module
    return dict(sorted(found.items()))


SOURCES: dict[str, ModuleType] = _discover()

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
