"""Image codec of the prepared format: lossless PNG bytes <-> uint8 arrays, and resizing.

Only numpy and PIL at import time: Ray Data's decode tasks import this module
(through ``pipelines/data/decode.py``) and would otherwise each load torch, about
0.3 GiB per worker process. ``resize_batch`` imports torch when it has to
resize, so the common case (training at the prepared size) never does.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

PNG_LEVEL = 1   # fastest zlib level; PNG is lossless at every level


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8, C in {1, 3} -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


def decode_batch(blobs, channels: int) -> np.ndarray:
    """Sequence of PNG bytes -> (n, C, H, W) uint8."""
    return np.stack([decode_png(b, channels) for b in blobs]).transpose(0, 3, 1, 2)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(n, C, H, W) uint8 -> (n, C, size, size) uint8, bilinear with antialiasing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()
