"""Decoding image files for folder sources, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def natural_channels(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


def peek(path: Path) -> tuple[int, int, int]:
    """(height, width, channels) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0], natural_channels(im.mode)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def load_image(path: Path, expect: tuple[int, int, int], size: int, resize: bool, crop: float = 1.0,
         where: str = "") -> np.ndarray:
    """Decode one file to (size, size, C) uint8.

    ``expect`` = (H, W, C) every image must have unless ``resize``: then the
    channel count is converted, a centred square of ``crop`` times the short
    side is cut and resized (Lanczos) to ``size``.
    """
    h0, w0, c0 = expect
    try:
        with Image.open(path) as im:
            im.load()
            h, w, c = im.size[1], im.size[0], natural_channels(im.mode)
            if not resize and (h, w, c) != (h0, w0, c0):
                raise DataError(f"{where}image {path} is {w}x{h} with {c} channel(s); the dataset's "
                                f"images are {w0}x{h0} with {c0}: pass resize=True (--resize) "
                                f"to convert")
            im = im.convert("L" if c0 == 1 else "RGB")
            side = int(round(min(h, w) * crop))
            if (h, w) != (side, side):
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side))
            if side != size:
                if not resize and crop == 1.0:
                    raise DataError(f"{where}image {path} is {w}x{h}, not {size}x{size}: pass "
                                    f"resize=True (--resize) to resize")
                im = im.resize((size, size), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}cannot read image {path}: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr
