"""Decoding image files for folder sources, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..codec import SQUARE_HINT, flatten_alpha, square_image
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
         where: str = "", square: str | None = None, flattened: list | None = None) -> np.ndarray:
    """Decode one file to (size, size, C) uint8.

    ``expect`` = (H, W, C) every image must have unless ``resize``: then the
    channel count is converted and the image resized (Lanczos) to ``size``.
    Transparency is composited onto white (``codec.flatten_alpha``); the path
    of an image that had transparent pixels is appended to ``flattened``. A
    non-square image is made square as ``square`` says (``"crop"`` or
    ``"pad"``, ``codec.square_image``) and refused without it. Then a centred
    square of ``crop`` times the side is cut (chairs3d's framing).
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
            if h != w and square is None:
                raise DataError(f"{where}image {path} is {w}x{h}, not square: pass {SQUARE_HINT}")
            im, was_transparent = flatten_alpha(im)
            if was_transparent and flattened is not None:
                flattened.append(str(path))
            im = square_image(im.convert("L" if c0 == 1 else "RGB"), square or "crop")
            side = int(round(im.size[0] * crop))
            if side != im.size[0]:
                left = (im.size[0] - side) // 2
                im = im.crop((left, left, left + side, left + side))
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
