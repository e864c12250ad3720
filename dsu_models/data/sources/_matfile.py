"""Stream one array out of a MATLAB v5 ``.mat`` file in bounded memory.

scipy's ``loadmat`` materialises whole arrays (SVHN's ``extra_32x32.mat`` is
1.6 GB of pixels). Layout (MATLAB "MAT-File Format", level 5): a 128-byte
header, then data elements, each an 8-byte tag (type, byte count; "small"
elements pack both into 4 bytes) and a payload. A variable is an miMATRIX
element (flags, dimensions, name, real part), possibly wrapped in an
miCOMPRESSED (zlib) element. Data are in Fortran order. Little-endian files only.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError

MI_MATRIX, MI_COMPRESSED = 14, 15
_DTYPES = {1: "<i1", 2: "<u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4", 9: "<f8",
           12: "<i8", 13: "<u8"}


class _Stream:
    """Exact reads from a file region, optionally through zlib."""

    def __init__(self, f, nbytes: int, compressed: bool, path: Path):
        self.f, self.left, self.path = f, nbytes, path
        self.z = zlib.decompressobj() if compressed else None
        self.buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.z is not None and self.z.unconsumed_tail:
                self.buf += self.z.decompress(self.z.unconsumed_tail, 1 << 22)
                continue
            raw = self.f.read(min(self.left, 1 << 20))
            if not raw:
                raise DataError(f"{self.path}: truncated .mat file (wanted {n} more bytes)")
            self.left -= len(raw)
            self.buf += raw if self.z is None else self.z.decompress(raw, 1 << 22)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def tag(self) -> tuple[int, int, bytes | None]:
        """(type, nbytes, small-element payload or None)."""
        first, second = struct.unpack("<II", self.read(8))
        if first >> 16:
            return first & 0xFFFF, first >> 16, struct.pack("<I", second)[: first >> 16]
        return first, second, None

    def element(self) -> tuple[int, bytes]:
        typ, n, small = self.tag()
        if small is not None:
            return typ, small
        data = self.read(n)
        self.read((-n) % 8)
        return typ, data


def _header(s: _Stream, path: Path):
    """After an miMATRIX tag: (name, dims, dtype, data nbytes)."""
    s.element()                                     # array flags
    _, dims = s.element()
    _, name = s.element()
    typ, n, small = s.tag()
    if small is not None or typ not in _DTYPES:
        raise DataError(f"{path}: unsupported data element type {typ} in variable {name!r}")
    return name.decode("ascii", "replace"), tuple(int(d) for d in np.frombuffer(dims, "<i4")), np.dtype(_DTYPES[typ]), n


def _find(f, path: Path, name: str):
    """Position the returned stream at the start of ``name``'s data."""
    head = f.read(128)
    if len(head) < 128 or head[126:128] != b"IM":
        raise DataError(f"{path}: not a little-endian MATLAB v5 .mat file")
    while True:
        tag = f.read(8)
        if len(tag) < 8:
            raise DataError(f"{path}: variable {name!r} not found")
        typ, nbytes = struct.unpack("<II", tag)
        start = f.tell()
        compressed = typ == MI_COMPRESSED
        s = _Stream(f, nbytes, compressed, path)
        if compressed:
            typ, _, _ = s.tag()
        if typ == MI_MATRIX:
            var, dims, dtype, n = _header(s, path)
            if var == name:
                return s, dims, dtype
        f.seek(start + nbytes + (0 if compressed else (-nbytes) % 8))


def array_shape(path: str | Path, name: str) -> tuple[int, ...]:
    path = Path(path)
    with open(path, "rb") as f:
        return _find(f, path, name)[1]


def iter_last_axis(path: str | Path, name: str, rows: int) -> Iterator[np.ndarray]:
    """Blocks of up to ``rows`` slices along the last axis, each (k, *dims[:-1]) in C order."""
    path = Path(path)
    with open(path, "rb") as f:
        s, dims, dtype = _find(f, path, name)
        per = int(np.prod(dims[:-1])) * dtype.itemsize
        for a in range(0, dims[-1], rows):
            k = min(rows, dims[-1] - a)
            block = np.frombuffer(s.read(k * per), dtype).reshape((k,) + tuple(reversed(dims[:-1])))
            yield block.transpose((0,) + tuple(range(len(dims) - 1, 0, -1)))
