"""``shapes3d``: built-in procedural RGB scenes modelled on 3D Shapes.

A wall (upper part) and a floor (lower part, shaded by depth) with an object
standing in the middle. Factors (docs/method.md section 10, 3D Shapes row):
floor_hue, wall_hue, object_hue (10 hues evenly spaced on the hue circle),
scale (8), shape (4: cube, sphere, cone, pill) and orientation (15 in-plane
rotations over [-80, 80] degrees). Every object carries a dark stripe from its
centre to its front, so orientation reads even on the sphere: 3D Shapes' +-30
degree azimuth would be a fraction of a pixel at 32 px. Rendering is a pure
function of the factor values, vectorised over a batch; any even size works.
"""
from __future__ import annotations

import numpy as np

from ..base import FactorInfo
from . import _procedural as P
from ._common import SourcePlan

NAME = "shapes3d"
FACTORS = [("floor_hue", 10), ("wall_hue", 10), ("object_hue", 10), ("scale", 8),
           ("shape", 4), ("orientation", 15)]
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 3
OPTIONS = {"num_samples": None}   # None = the full grid (480,000) when preparing
IN_MEMORY = True                  # load_builtin draws it; no files to prepare
DEFAULT_SAMPLES = 20_000          # grid points a config with num_samples: null draws
GENERATOR_VERSION = 2             # bump when the drawing changes (part of the hash)

HUES = np.arange(10, dtype=np.float32) / 10
SCALES = np.linspace(0.75, 1.3, 8, dtype=np.float32)
SHAPES = ("cube", "sphere", "cone", "pill")
ANGLES_DEG = np.linspace(-80.0, 80.0, 15, dtype=np.float32)
HORIZON, OBJ_X, OBJ_Y, OBJ_R = 0.56, 0.5, 0.58, 0.21   # smallest object ~10 px across at 32 px
CLASS_NAMES = {
    "floor_hue": tuple(f"{h:.1f}" for h in HUES), "wall_hue": tuple(f"{h:.1f}" for h in HUES),
    "object_hue": tuple(f"{h:.1f}" for h in HUES), "scale": tuple(f"{s:.2f}" for s in SCALES),
    "shape": SHAPES, "orientation": tuple(f"{a:g}" for a in ANGLES_DEG),
}


def factor_table() -> list[FactorInfo]:
    return [FactorInfo(n, c, CLASS_NAMES[n]) for n, c in FACTORS]


def _shape_sd(shape: np.ndarray, u, v, r):
    """Signed distance of each sample's shape in its local frame (u = front).

    Silhouettes chosen to stay apart at every scale and rotation at 32 px: a
    square with corners well outside the disc, a smaller disc, a tall triangle
    and a capsule 2.5 times as long as it is wide.
    """
    sd = np.empty(np.broadcast_shapes(u.shape, v.shape), np.float32)
    for k, fn in enumerate((
            lambda u, v, r: P.sd_box(u, v, 0.8 * r, 0.8 * r),
            lambda u, v, r: P.sd_circle(u, v, 0.82 * r),
            lambda u, v, r: P.sd_triangle(u + 0.15 * r, v, 1.25 * r),
            lambda u, v, r: P.sd_capsule(u, v, 0.62 * r, 0.42 * r))):
        sel = shape == k
        if sel.any():
            sd[sel] = fn(u[sel], v[sel], r[sel])
    return sd


def render(labels: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """labels: (n, 6) class indices -> images (n, size, size, 3) uint8 (drawn in slices)."""
    return P.render_in_slices(_draw, labels, size, CHANNELS)


def _draw(labels: np.ndarray, size: int) -> np.ndarray:
    """labels: (n, 6) class indices -> images (n, size, size, 3) uint8."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    x, y = P.grid(size)
    fh, wh, oh = (HUES[labels[:, j]] for j in range(3))
    r = (OBJ_R * SCALES[labels[:, 3]])[:, None, None]
    shape = labels[:, 4]
    # 0 degrees = front pointing up; positive = clockwise
    angle = np.deg2rad(ANGLES_DEG[labels[:, 5]]) - np.pi / 2
    # background: flat wall above the horizon, floor below it getting lighter towards the viewer
    depth = np.clip((y - HORIZON) / (1 - HORIZON), 0, 1)
    wall = P.hsv_to_rgb(wh, 0.75, 0.92)[:, None, None, :]                           # (n,1,1,3)
    floor_v = (0.55 + 0.4 * depth)[..., None]                                      # (1,S,1,1)
    floor = P.hsv_to_rgb(fh, 0.75, 1.0)[:, None, None, :] * floor_v                 # (n,S,1,3)
    is_floor = (y >= HORIZON)[..., None]
    img = np.where(is_floor, floor, wall) * np.ones((1, 1, size, 1), np.float32)
    # soft contact shadow under the object
    sh = np.exp(-(((x - OBJ_X) / (1.1 * r)) ** 2 + ((y - (OBJ_Y + r)) / (0.25 * r)) ** 2))
    img = img * (1 - 0.45 * (sh * is_floor[..., 0])[..., None])
    # object, lit from the top left; the sphere gets round shading, the others flat faces
    cx = np.full(n, OBJ_X, np.float32)
    cy = np.full(n, OBJ_Y, np.float32)
    u, v = P.rotate(x, y, cx, cy, angle)
    sd = _shape_sd(shape, u, v, r)
    a = P.coverage(sd, size)[..., None]
    flat = 1.0 - 0.3 * np.clip(((x - OBJ_X) + (y - OBJ_Y)) / (2.5 * r) + 0.5, 0, 1)
    ball = 1.0 - 0.6 * np.clip(np.hypot(x - OBJ_X + 0.3 * r, y - OBJ_Y + 0.3 * r) / (1.2 * r), 0, 1)
    light = np.where((shape == 1)[:, None, None], ball, flat)
    obj = P.hsv_to_rgb(oh, 0.85, 1.0)[:, None, None, :] * light[..., None]
    img = img * (1 - a) + obj * a
    # orientation mark: a near-black stripe at least 1.5 px wide from the centre to the front edge
    half_w = np.maximum(0.16 * r, 0.75 / size)
    stripe = np.maximum(P.sd_box(u - 0.6 * r, v, 0.6 * r, half_w), sd)
    b = P.coverage(stripe, size)[..., None] * 0.9
    img = img * (1 - b) + 0.08 * b
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def plan(opts: dict) -> SourcePlan:
    return P.grid_plan(NAME, FACTORS, factor_table(), CHANNELS, DEFAULT_IMAGE_SIZE,
                       GENERATOR_VERSION, render, opts)
