"""Turn what users pass as "images" into one checked batch tensor (docs/method.md section 1:
images are ``(B, C, H, W)`` in [-1, 1] inside the networks).

Accepted, for a model of ``C`` channels and ``S x S`` pixels:

- torch tensors ``(C, H, W)`` or ``(B, C, H, W)``: uint8 in [0, 255] or float in
  [-1, 1]. Tensors are never resized: they are taken to be network inputs
  already, so a wrong size is an error.
- numpy uint8 arrays ``(H, W)``, ``(H, W, C)`` or ``(B, H, W, C)`` (the layout image
  libraries use). Other sizes are resized to ``S x S`` (bilinear with
  antialiasing, as when datasets are prepared).
- PIL images: converted to the model's mode (``RGB`` for 3 channels, ``L`` for 1,
  so RGBA or palette PNGs work) and resized like numpy arrays.
- a list or tuple of any of the above, concatenated in order.

Wrong channel counts, dtypes, ranks or value ranges raise ``ValueError`` saying
what was expected and what came.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dsu_models.data.base import to_float

_FLOAT_SLACK = 1e-3  # float inputs may overshoot [-1, 1] by rounding


def image_batch(images: Any, channels: int, size: int) -> Tensor:
    """A CPU tensor ``(B, channels, size, size)``: uint8, or float in [-1, 1].

    images: see the module docstring. uint8 stays uint8 (4x smaller); callers
    convert per chunk with :func:`dsu_models.data.base.to_float`.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: got an empty list")
        parts = [image_batch(item, channels, size) for item in images]
        if len({p.dtype for p in parts}) > 1:
            parts = [to_float(p) if p.dtype == torch.uint8 else p for p in parts]
        return torch.cat(parts)
    if isinstance(images, Tensor):
        return _from_tensor(images, channels, size)
    if isinstance(images, np.ndarray):
        return _from_numpy(images, channels, size)
    if isinstance(images, Image.Image):
        return _from_pil(images, channels, size)
    raise ValueError(f"images: unsupported type {type(images).__name__}; pass a torch tensor "
                     f"(B, C, H, W), a uint8 numpy array (H, W, C) or (B, H, W, C), a PIL image "
                     f"or a list of those")


def _from_tensor(x: Tensor, channels: int, size: int) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images: a tensor must be (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        hint = (" (it looks channels-last: pass a numpy array, or permute to (B, C, H, W))"
                if x.shape[-1] == channels else "")
        raise ValueError(f"images: the model takes {channels}-channel images (B, {channels}, H, W), "
                         f"got a tensor of shape {tuple(x.shape)}{hint}")
    if tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"images: the model takes {size}x{size} images, got a tensor of "
                         f"{x.shape[2]}x{x.shape[3]}; tensors are not resized (numpy arrays and "
                         f"PIL images are)")
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images: tensors must be uint8 in [0, 255] or float in [-1, 1], got {x.dtype}")
    if x.numel():
        low, high = float(x.min()), float(x.max())
        if not (low >= -1 - _FLOAT_SLACK and high <= 1 + _FLOAT_SLACK):
            raise ValueError(f"images: float tensors must be in [-1, 1], got values in "
                             f"[{low:.4g}, {high:.4g}] (uint8 tensors are read as [0, 255])")
    return x.float().clamp(-1, 1)


def _from_numpy(a: np.ndarray, channels: int, size: int) -> Tensor:
    if a.dtype != np.uint8:
        raise ValueError(f"images: numpy arrays must be uint8 (H, W, C) in [0, 255], got {a.dtype}; "
                         f"pass float images as a torch tensor (B, C, H, W) in [-1, 1]")
    if a.ndim == 2:
        a = a[None, :, :, None]
    elif a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"images: numpy arrays must be (H, W), (H, W, C) or (B, H, W, C), "
                         f"got shape {a.shape}")
    if a.shape[-1] != channels:
        raise ValueError(f"images: the model takes {channels}-channel images (H, W, {channels}), "
                         f"got a numpy array of shape {a.shape}")
    batch = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    if batch.shape[2] != batch.shape[3]:
        raise ValueError(f"images: images must be square to be resized to {size}x{size}, "
                         f"got {batch.shape[3]}x{batch.shape[2]} (WxH); make them square first: "
                         f"dsu_models.data.codec.square_image(image, 'crop' or 'pad'), or "
                         f"--square crop|pad on the command line")
    return _resized(torch.from_numpy(batch), size)


def _resized(x: Tensor, size: int) -> Tensor:
    """uint8 (B, C, H, W) -> (B, C, size, size), bilinear with antialiasing (the
    resampling ``dsu_models.data.codec.resize_batch`` uses when preparing data)."""
    if tuple(x.shape[2:]) == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _from_pil(image: Image.Image, channels: int, size: int) -> Tensor:
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"images: PIL images work with 1- or 3-channel models; this one has "
                         f"{channels} channels (pass a uint8 numpy array)")
    return _from_numpy(np.asarray(image.convert(modes[channels])), channels, size)
