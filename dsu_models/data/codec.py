"""Image codec of the prepared format: lossless PNG bytes <-> uint8 arrays, and resizing;
and the two conversions every reader of users' images applies the same way
(preparation of an image folder, ``python -m dsu_models``): transparency
composited onto white (:func:`flatten_alpha`) and, when asked, a photo made
square (:func:`square_image`).

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


# how a non-square image is made square: never silently (the option / flag names these)
SQUARE_MODES = ("crop", "pad")
SQUARE_HINT = ("--square crop (keep the centred square) or --square pad (pad the short side "
               "with black)")
BACKGROUND = (255, 255, 255)   # transparent pixels become white, as a page shows them


def flatten_alpha(image: Image.Image) -> tuple[Image.Image, bool]:
    """An image without transparency: one with an alpha channel (RGBA, LA, a
    palette or colour key with transparency) composited onto white.

    Returns (image, whether any pixel was not fully opaque): a fully opaque
    alpha channel is dropped without loss, and the caller notes only the
    images whose look changed."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image, False
    rgba = image.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB"), False
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return flat.convert("RGB"), True


def square_image(image: Image.Image, how: str) -> Image.Image:
    """A square image: ``crop`` keeps the centred square of side min(W, H);
    ``pad`` centres the image on a black square of side max(W, H)."""
    w, h = image.size
    if w == h:
        return image
    if how == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))
    if how == "pad":
        if image.mode not in ("1", "L", "I", "I;16", "F", "RGB"):
            image = image.convert("RGB")    # 0 is not black in a palette or in CMYK
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), 0)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas
    raise ValueError(f"square: {how!r} is not one of {', '.join(SQUARE_MODES)}")


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(n, C, H, W) uint8 -> (n, C, size, size) uint8, bilinear with antialiasing."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()
