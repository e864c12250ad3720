"""``sprites``: built-in procedural grayscale sprites modelled on dSprites.

A white shape on black. Factors (docs/method.md section 10, dSprites row, with fewer
orientation and position classes, see below): shape (3: square, ellipse,
heart), scale (6, geometric from 0.65 to 1 of the largest size), orientation
(12, 30 degrees apart) and x and y (16 positions each, 0.22 to 0.78 of the side).

Drawn so that every factor reads from the pixels at 32 px: a small CNN reaches
>= 0.95 exact test accuracy on each (tests/test_procedural_readable.py).

* Fewer classes than dSprites' 39 orientations and 32 positions (the
  ``sprites_full`` source draws these sprites on that grid, at 64 px). Those
  positions are 2 px apart at 64 px; at 32 px they would be 0.6 px apart, and
  9.2 degree steps turn the edge of an 8-13 px sprite by under a pixel (generator
  v2 had them: the CNN read orientation .16 and position .72 exact). Here
  positions are 1.2 px apart at 32 px and orientations 30 degrees.
* Orientation follows the *relabelled* real dSprites (docs/method.md section 10
  quirk): label t is the angle ``2*pi*t/12``, counter-clockwise from up, and
  labels go round in order. Every shape carries the same mark, a dark notch
  from its centre out through its front edge (a straight slot in the square and
  the ellipse; in the heart, whose front is its lobes, the cleft between them
  deepened into a V), so each is rotated by the full angle and every (shape,
  orientation) pair is a distinct image. At angle 0 the heart stands upright.
* Position is the area centroid: each shape rotates about its centroid, so the
  centre of the white area does not move with orientation.
* The three shapes have equal areas at one scale, so the white area alone gives
  the scale (steps of 9% in size, 19% in area). The largest ellipse's tip can
  leave the image by up to 1.5 px at the outermost positions (a square's
  corner by 0.1 px).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..base import FactorInfo
from . import _procedural as P
from ._common import SourcePlan

NAME = "sprites"
DEFAULT_IMAGE_SIZE = 32
CHANNELS = 1
OPTIONS = {"num_samples": None}   # None = the full grid (55,296) when preparing
IN_MEMORY = True                  # load_builtin draws it; no files to prepare
DEFAULT_SAMPLES = 20_000          # grid points a config with num_samples: null draws
GENERATOR_VERSION = 3

SHAPES = ("square", "ellipse", "heart")
SCALES = np.geomspace(0.65, 1.0, 6).astype(np.float32)
AREA_R = 0.16       # every largest sprite has the area of a disc this radius (image sides): 5.1 px at 32 px
NOTCH = 0.2         # half width of the square's and ellipse's slot, in shape radii
CLEFT_DEG = 15.0    # half angle of the heart's V cleft


@dataclass(frozen=True)
class Grid:
    """The orientation and position classes: ``orientations`` angles ``2*pi*t/n``
    and ``positions`` centres evenly from 0.22 to 0.78 of the side, on x and y.
    This source uses :data:`READABLE`; ``sprites_full`` draws the same sprites
    on dSprites' grid (:data:`DSPRITES`)."""

    orientations: int
    positions: int

    @property
    def angles(self) -> np.ndarray:
        return (2 * np.pi * np.arange(self.orientations) / self.orientations).astype(np.float32)

    @property
    def centres(self) -> np.ndarray:
        return np.linspace(0.22, 0.78, self.positions, dtype=np.float32)

    @property
    def factors(self) -> list[tuple[str, int]]:
        return [("shape", 3), ("scale", len(SCALES)), ("orientation", self.orientations),
                ("x", self.positions), ("y", self.positions)]

    def class_names(self) -> dict[str, tuple[str, ...]]:
        centres = tuple(f"{p:.3f}" for p in self.centres)
        return {"shape": SHAPES, "scale": tuple(f"{s:.2f}" for s in SCALES),
                "orientation": tuple(f"{a:.3f}" for a in self.angles), "x": centres, "y": centres}


READABLE = Grid(orientations=12, positions=16)
DSPRITES = Grid(orientations=39, positions=32)   # dSprites' counts without its duplicate 40th angle
FACTORS = READABLE.factors
POSITIONS = READABLE.centres


def factor_table(grid: Grid = READABLE) -> list[FactorInfo]:
    names = grid.class_names()
    return [FactorInfo(n, c, names[n]) for n, c in grid.factors]


def render(labels: np.ndarray, size: int = DEFAULT_IMAGE_SIZE, grid: Grid = READABLE) -> np.ndarray:
    """labels: (n, 5) class indices on ``grid`` -> images (n, size, size, 1) uint8
    (drawn in slices)."""
    return P.render_in_slices(functools.partial(_draw, grid=grid), labels, size, CHANNELS)


def _sd_heart(u, v, r):
    """Heart with its lobes to the front (+u) and its tip at -r: two discs and
    the polygon between them and the tip, bounded by the tangents from the tip."""
    cu, cv, rho, tip = 0.25 * r, 0.45 * r, 0.5 * r, -r
    lobes = np.minimum(np.hypot(u - cu, v - cv), np.hypot(u - cu, v + cv)) - rho
    # the tangent from the tip to a lobe leaves the tip at angle a from the +u axis
    d = np.hypot(cu - tip, cv)
    a = np.arctan2(cv, cu - tip) + np.arcsin(rho / d)
    ca, sa = np.cos(a), np.sin(a)
    reach = np.sqrt(d * d - rho * rho)                                # tip to tangent point
    tangents = -(u - tip) * sa + np.abs(v) * ca
    radii = (u - tip) * ca + np.abs(v) * sa - reach                   # tangent point to lobe centre
    polygon = np.maximum(np.maximum(tangents, radii), u - cu)
    body = np.minimum(lobes, polygon)
    t = np.tan(np.deg2rad(CLEFT_DEG))
    cleft = np.maximum((np.abs(v) - t * u) / np.sqrt(1 + t * t), -u)  # V from the centre to the front
    return np.maximum(body, -cleft)


def _sd_local(shape: int, u, v, r):
    """Signed distance of one shape (0, 1, 2) of radius r (broadcastable) in its
    own frame: front to +u, not yet centred on its centroid nor area-matched."""
    if shape == 2:
        return _sd_heart(u, v, r)
    slot = P.sd_box(u - 0.6 * r, v, 0.6 * r, NOTCH * r)
    body = P.sd_box(u, v, 0.8 * r, 0.8 * r) if shape == 0 else P.sd_ellipse(u, v, r, 0.55 * r)
    return np.maximum(body, -slot)


@functools.cache
def _geometry() -> tuple[np.ndarray, np.ndarray]:
    """Per shape: (radius factor giving the area of a unit disc, centroid u in radii),
    measured once on a fine grid at r = 1."""
    c = np.linspace(-1.6, 1.6, 801, dtype=np.float32)
    u, v = c[None, None, :], c[None, :, None]
    gain, centre = [], []
    for k in range(len(SHAPES)):
        a = P.coverage(_sd_local(k, u, v, np.float32(1.0)), 1.0 / float(c[1] - c[0]))
        area = a.sum() * float(c[1] - c[0]) ** 2
        gain.append(np.sqrt(np.pi / area))
        centre.append((a * u).sum() / a.sum())
    return np.array(gain, np.float32), np.array(centre, np.float32)


def _draw(labels: np.ndarray, size: int, grid: Grid) -> np.ndarray:
    """labels: (n, 5) class indices on ``grid`` -> images (n, size, size, 1) uint8."""
    labels = np.asarray(labels, dtype=np.int64)
    gain, centre = _geometry()
    x, y = P.grid(size)
    shape = labels[:, 0]
    r = (AREA_R * SCALES[labels[:, 1]] * gain[shape])[:, None, None]
    # angle 0: front pointing up; counter-clockwise on screen
    centres = grid.centres
    angle = -grid.angles[labels[:, 2]] - np.pi / 2
    u, v = P.rotate(x, y, centres[labels[:, 3]], centres[labels[:, 4]], angle)
    u = u + centre[shape][:, None, None] * r          # the centroid sits on the position
    sd = np.empty(u.shape, np.float32)
    for k in range(len(SHAPES)):
        sel = shape == k
        if sel.any():
            sd[sel] = _sd_local(k, u[sel], v[sel], r[sel])
    img = P.coverage(sd, size)
    return (img * 255.0 + 0.5).astype(np.uint8)[..., None]


def plan(opts: dict) -> SourcePlan:
    return grid_source_plan(NAME, READABLE, DEFAULT_IMAGE_SIZE, GENERATOR_VERSION, opts)


def grid_source_plan(name: str, grid: Grid, default_size: int, version: int, opts: dict) -> SourcePlan:
    """Plan for these sprites drawn on ``grid`` (this source and ``sprites_full``)."""
    return P.grid_plan(name, grid.factors, factor_table(grid), CHANNELS, default_size, version,
                       functools.partial(render, grid=grid), opts)
