"""Data layer: sources, the prepared format, and in-memory datasets.

Public API (no Ray here; the Ray jobs live in ``pipelines/``):

- :func:`load_builtin` — shapes3d / sprites / digits generated in memory;
- :func:`prepare` — any source -> a prepared, versioned directory;
- :func:`read_manifest`, :func:`read_split` — read a prepared directory back;
- :func:`val_rows`, :func:`split_rows`, :func:`row_filter` — the validation
  split's rule, a split's row count, and the rows an old dataset's split keeps.

The names below are imported on first use (PEP 562), so that importing a
light submodule such as ``dsu_models.data.codec`` (what Ray Data's decode
workers need) does not pull in torch through the rest of the package.
"""
from __future__ import annotations

import importlib

_HOMES = {
    ".base": ["MISSING", "FactorInfo", "InMemoryDataset", "measured_frequencies", "to_float",
              "to_uint8"],
    ".errors": ["DataError"],
    ".manifest": ["FORMAT_VERSION", "read_manifest"],
    ".codec": ["decode_batch", "encode_png", "resize_batch"],
    ".prepared": ["prepare", "read_split", "split_files"],
    ".splits": ["has_val", "row_filter", "split_rows", "val_rows"],
    ".sources": ["SOURCES", "get_source"],
    ".sources.builtin": ["load_builtin"],
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
