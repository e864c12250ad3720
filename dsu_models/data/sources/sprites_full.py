"""``sprites_full``: the ``sprites`` drawings on dSprites' own class grid.

Factors: shape (3), scale (6), orientation (39, 9.2 degrees apart), x and y
(32 positions each, 0.22 to 0.78 of the side): the dSprites counts of docs/method.md
section 10 (its 40th orientation repeats the first and is left out, as the
dSprites loader does). Drawn at 64 px by default, where positions are 1.2 px
apart, as in ``sprites`` at 32 px; at 32 px neighbouring positions are 0.6 px
apart and neighbouring orientations barely differ, so use ``sprites`` there.
Same shapes, sizes, orientation convention and front mark as ``sprites``
(see its docstring).

Readable, but not as easily as ``sprites`` at 32 px: the PoolHead CNN of
``tests/test_procedural_readable.py`` (64 px, 8 epochs) read shape and scale
.999 exactly with 8,000 or 24,000 samples; orientation, x and y reached .68,
.69 and .73 with 8,000 (.98-.995 within one class) and .975, .932 and .934
with 24,000.
"""
from __future__ import annotations

from ._common import SourcePlan
from .sprites import CHANNELS, DSPRITES, grid_source_plan

NAME = "sprites_full"
FACTORS = DSPRITES.factors
DEFAULT_IMAGE_SIZE = 64
OPTIONS = {"num_samples": None}   # None = the full grid (737,280) when preparing
IN_MEMORY = True                  # load_builtin draws it; no files to prepare
# grid points a config with num_samples: null draws: about 32,400 train rows after test and
# val, so the evaluation oracles get the 32,000 that configs/datasets/sprites_full.yaml asks for
DEFAULT_SAMPLES = 40_000
GENERATOR_VERSION = 1


def plan(opts: dict) -> SourcePlan:
    return grid_source_plan(NAME, DSPRITES, DEFAULT_IMAGE_SIZE, GENERATOR_VERSION, opts)
