"""``sprites``: built-in procedural grayscale sprites modelled on dSprites.

A white shape on black. Factors (METHOD.md section 10, dSprites row): shape
(3: square, ellipse, heart), scale (6, 0.6 to 1 of the largest size),
orientation (39), x and y (32 positions each).

Orientation follows the *relabelled* real dSprites (METHOD.md section 10
quirk): label t is the angle 2*pi*t/39 of the shape's symmetry-reduced pose,
so labels go round in order. Plain squares and ellipses would then differ by
2.3 and 4.6 degrees per label, invisible at 32 px, so the square and the
ellipse carry a black slot from the centre through the front edge that breaks their symmetry and are rotated by the
full 2*pi*t/39 like the heart: every (shape, orientation) pair is a distinct,
readable image and the labels still go round in order.
"""
from __future__ import annotations

import numpy as np

from ..base import FactorInfo
from . import _procedural as P
from ._common import SourcePlan

NAME = "sprites"
FACTORS = [("shape", 3), ("scale", 6), ("orientation", 39), ("x", 32), ("y", 32)]
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 1
OPTIONS = {"num_samples": None}   # None = the full grid (718,848) when preparing
GENERATOR_VERSION = 2

SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.6, 1.0, 6, dtype=np.float32)   # smallest ~8 px across at 32 px
ANGLES = (2 * np.pi * np.arange(39) / 39).astype(np.float32)
POSITIONS = np.linspace(0.2, 0.8, 32, dtype=np.float32)
MAX_R = 0.2   # radius of the largest sprite, in image sides
CLASS_NAMES = {
    "shape": SHAPES, "scale": tuple(f"{s:.2f}" for s in SCALES),
    "orientation": tuple(f"{a:.3f}" for a in ANGLES),
    "x": tuple(f"{p:.3f}" for p in POSITIONS), "y": tuple(f"{p:.3f}" for p in POSITIONS),
}


def factor_infos() -> list[FactorInfo]:
    return [FactorInfo(n, c, CLASS_NAMES[n]) for n, c in FACTORS]


def render(labels: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """labels: (n, 5) class indices -> images (n, size, size, 1) uint8 (drawn in slices)."""
    return P.render_in_slices(_draw, labels, size, CHANNELS)


def _draw(labels: np.ndarray, size: int) -> np.ndarray:
    """labels: (n, 5) class indices -> images (n, size, size, 1) uint8."""
    labels = np.asarray(labels, dtype=np.int64)
    x, y = P.grid(size)
    shape = labels[:, 0]
    r = (MAX_R * SCALES[labels[:, 1]])[:, None, None]
    # angle 0: front (notch, heart tip) pointing up; counter-clockwise on screen
    angle = -ANGLES[labels[:, 2]] - np.pi / 2
    u, v = P.rotate(x, y, POSITIONS[labels[:, 3]], POSITIONS[labels[:, 4]], angle)
    sd = np.empty(np.broadcast_shapes(u.shape), np.float32)
    # slot: a black stripe at least 1.4 px wide from the centre out through the front edge
    notch = P.sd_box(u - 0.6 * r, v, 0.6 * r, np.maximum(0.15 * r, 0.7 / size))
    for k, fn in enumerate((
            lambda u, v, r, n: np.maximum(P.sd_box(u, v, 0.8 * r, 0.8 * r), -n),
            lambda u, v, r, n: np.maximum(P.sd_ellipse(u, v, r, 0.55 * r), -n),
            lambda u, v, r, n: P.sd_heart(u, v, r))):
        sel = shape == k
        if sel.any():
            sd[sel] = fn(u[sel], v[sel], r[sel], notch[sel])
    img = P.coverage(sd, size)
    return (img * 255.0 + 0.5).astype(np.uint8)[..., None]


def plan(opts: dict) -> SourcePlan:
    return P.grid_plan(NAME, FACTORS, factor_infos(), CHANNELS, DEFAULT_IMAGE_SIZE,
                       GENERATOR_VERSION, render, opts)
