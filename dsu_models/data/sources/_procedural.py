"""Vectorised drawing helpers for the built-in procedural datasets.

Shapes are signed distance fields (negative inside, in pixels) evaluated on a
coordinate grid for a whole batch at once; ``coverage`` turns a distance into
an antialiased pixel coverage in [0, 1] (one pixel wide ramp), so sub-pixel
changes of position, scale and angle stay visible at 32 px.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import numpy as np

from ..base import FactorInfo
from ._common import TEST, TRAIN, Chunk, SourcePlan, ranges, test_mask


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (1, S, S) in units of the image side: x right, y down."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, None, :], c[None, :, None]


def rotate(x, y, cx, cy, angle):
    """Coordinates relative to (cx, cy) in the frame rotated by ``angle`` (n,) radians."""
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    return c * dx + s * dy, -s * dx + c * dy


def coverage(sd: np.ndarray, size: int) -> np.ndarray:
    """Signed distance in image units -> antialiased coverage in [0, 1]."""
    return np.clip(0.5 - sd * size, 0.0, 1.0)


def sd_box(u, v, hu, hv):
    """Box of half sizes (hu, hv) (broadcastable (n,1,1))."""
    qu, qv = np.abs(u) - hu, np.abs(v) - hv
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0)


def sd_circle(u, v, r):
    return np.hypot(u, v) - r


def sd_ellipse(u, v, a, b):
    """Approximate ellipse distance (exact on the axes; fine for a 1 px ramp)."""
    k = np.hypot(u / a, v / b)
    grad = np.hypot(u / (a * a), v / (b * b)) + 1e-9
    return k * (k - 1.0) / grad


def sd_capsule(u, v, half_len, r):
    """Segment from (-half_len, 0) to (half_len, 0) thickened by r."""
    return np.hypot(u - np.clip(u, -half_len, half_len), v) - r


def sd_triangle(u, v, r):
    """Isosceles triangle pointing to +u with circumradius r (max of half planes)."""
    d = u * 0 - np.inf
    for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
        # edge opposite vertex at angle a; outward normal points away from it
        nx, ny = -np.cos(a), -np.sin(a)
        d = np.maximum(d, u * nx + v * ny - 0.5 * r)
    return d


def hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB; inputs broadcast, output (..., 3) in [0, 1]."""
    h = np.asarray(h, dtype=np.float32) % 1.0
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + h[..., None] * 6.0) % 6.0
    f = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.asarray(v, np.float32)[..., None] * (1 - np.asarray(s, np.float32)[..., None] * f)


def grid_size(factors) -> int:
    return int(np.prod([c for _, c in factors]))


def grid_indices(factors, flat: np.ndarray) -> np.ndarray:
    """Flat grid index (n,) -> per-factor class indices (n, F), last factor fastest."""
    return np.stack(np.unravel_index(np.asarray(flat, np.int64), [c for _, c in factors]), 1).astype(np.int64)


def subset_ids(factors, num_samples: int | None, seed: int, source: str) -> np.ndarray:
    """Sorted flat grid indices: the full grid, or a seeded subset without repetition."""
    from ..errors import DataError

    full = grid_size(factors)
    if num_samples is None or int(num_samples) == full:
        return np.arange(full, dtype=np.int64)
    n = int(num_samples)
    if not 1 <= n <= full:
        raise DataError(f"{source}: num_samples must be in [1, {full}] (the full factor grid), got {n}")
    return np.sort(np.random.default_rng([seed, 0x6121D]).choice(full, n, replace=False)).astype(np.int64)


RENDER_SLICE = 128   # images drawn at once: float temporaries stay ~50 MB at 64 px


def render_in_slices(draw, labels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Apply ``draw(labels, size) -> (n, S, S, C) uint8`` to slices of RENDER_SLICE rows.

    Drawing works on float32 arrays several times the size of the output; slicing
    bounds that memory whatever the chunk size (2,048 images at once at 64 px
    took 1.3 GB). Pixels do not depend on the slicing: each image is drawn alone.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), size, size, channels), np.uint8)
    for a in range(0, len(labels), RENDER_SLICE):
        out[a:a + RENDER_SLICE] = draw(labels[a:a + RENDER_SLICE], size)
    return out


def grid_plan(name: str, factors, infos: list[FactorInfo], channels: int, default_size: int,
              version: int, render: Callable, opts: dict) -> SourcePlan:
    """Plan a procedural dataset: a seeded subset of the factor grid, split by
    ``test_portion``, cut into chunks that :func:`grid_read` renders."""
    size = int(opts["image_size"] or default_size)
    ids = subset_ids(factors, opts["num_samples"], int(opts["seed"]), name)
    is_test = test_mask(len(ids), float(opts["test_portion"]), int(opts["seed"]))
    tasks = [{"ids": ids[a:b], "test": is_test[a:b], "size": size}
             for a, b in ranges(len(ids), int(opts["chunk_size"]))]
    read = functools.partial(grid_read, factors, render)  # picklable: module-level functions
    return SourcePlan(name, infos, channels, size, size, tasks, read, opts,
                      {"generator": f"{name}-v{version}"})


def grid_read(factors, render: Callable, task: dict) -> Iterator[Chunk]:
    """One chunk of a procedural dataset: labels from grid ids, rendered pixels."""
    ids = task["ids"]
    labels = grid_indices(factors, ids)
    split = np.where(task["test"], TEST, TRAIN).astype(np.int8)
    yield Chunk(split, ids, render(labels, task["size"]), labels)
