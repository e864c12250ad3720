"""Data layer: sources, the prepared format, and in-memory datasets.

Public API (no Ray here; the Ray jobs live in ``pipelines/``):

- :func:`load_builtin` — shapes3d / sprites / digits generated in memory;
- :func:`prepare` — any source -> a prepared, versioned directory;
- :func:`read_manifest`, :func:`read_split` — read a prepared directory back.
"""
from .base import FactorInfo, InMemoryDataset, measured_frequencies, to_float, to_uint8
from .errors import DataError
from .manifest import FORMAT_VERSION, read_manifest
from .prepared import decode_batch, encode_png, prepare, read_split, resize_batch, split_files
from .sources import SOURCES, get_source
from .sources.builtin import load_builtin

__all__ = ["FactorInfo", "InMemoryDataset", "measured_frequencies", "to_float", "to_uint8",
           "DataError", "FORMAT_VERSION", "read_manifest", "prepare", "read_split", "split_files",
           "decode_batch", "encode_png", "resize_batch", "SOURCES", "get_source", "load_builtin"]
