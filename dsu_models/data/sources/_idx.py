"""IDX ("Pascal Vincent") files of the MNIST family, memory-mapped.

Header: two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number
of dimensions, then each dimension as a big-endian int32; data follow in
big-endian C order. Memory mapping lets a task read only its rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def open_idx(path: str | Path) -> np.ndarray:
    """A read-only memory map of an (uncompressed) IDX file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _TYPES:
            raise DataError(f"{path}: not an IDX file (header bytes {head.hex()})")
        nd = head[3]
        dims = np.frombuffer(f.read(4 * nd), dtype=">i4").astype(np.int64)
    dtype = np.dtype(_TYPES[head[2]])
    expected = 4 + 4 * nd + int(np.prod(dims)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise DataError(f"{path}: truncated IDX file ({size} bytes, header promises {expected})")
    return np.memmap(path, dtype=dtype, mode="r", offset=4 + 4 * nd, shape=tuple(int(d) for d in dims))
