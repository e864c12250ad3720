"""``chairs3d``: 3D Chairs (Aubry et al. 2014) from its ``rendered_chairs`` folder.

Layout: ``ROOT/<chair id>/renders/image_NNN_pPPP_tTTT_rRRR.png`` (600x600 RGB,
white background); p is the altitude (2 values), t the azimuth (31 values).
Factors (docs/method.md section 10): class (the 1,393 chairs, sorted folder names
kept as class names), altitude (2), azimuth (31), each numbered by sorted
value. The centred ``crop`` fraction (default 0.75: the renders leave a wide
white margin) is resized to ``image_size`` (default 128). ids index the
sorted file list. No standard split: a seeded ``test_portion``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..base import FactorInfo
from ..errors import DataError
from . import _images
from ._common import SourcePlan, Chunk, TEST, TRAIN, ranges, test_mask, tree_fingerprint

NAME = "chairs3d"
FACTORS = [("class", None), ("altitude", 2), ("azimuth", 31)]
DEFAULT_IMAGE_SIZE = 128
CHANNELS = 3
OPTIONS = {"root": None, "crop": 0.75}
PATTERN = re.compile(r"image_(\d+)_p(\d+)_t(\d+)_r(\d+)\.png$")
FETCH = ("Download rendered_chairs.tar from https://www.di.ens.fr/willow/research/seeing3Dchairs/ "
         "and pass --root path/to/rendered_chairs.")


def _scan(root: Path):
    files, chair, alt, azi = [], [], [], []
    chairs = sorted(p.name for p in root.iterdir() if (p / "renders").is_dir())
    for k, name in enumerate(chairs):
        for p in sorted((root / name / "renders").iterdir()):
            m = PATTERN.match(p.name)
            if m:
                files.append(p)
                chair.append(k)
                alt.append(int(m.group(2)))
                azi.append(int(m.group(3)))
    return chairs, files, np.array(chair, np.int64), np.array(alt, np.int64), np.array(azi, np.int64)


def plan(opts: dict) -> SourcePlan:
    if opts["root"] is None:
        raise DataError(f"{NAME}: option 'root' (the rendered_chairs folder) is required. {FETCH}")
    root = Path(opts["root"])
    if not root.is_dir():
        raise DataError(f"{NAME}: {root} not found. {FETCH}")
    chairs, files, chair, alt, azi = _scan(root)
    if not files:
        raise DataError(f"{NAME}: no <chair>/renders/image_*_p*_t*_r*.png files under {root}. {FETCH}")
    factors = [FactorInfo("class", len(chairs), tuple(chairs))]
    labels = [chair]
    for name, values in (("altitude", alt), ("azimuth", azi)):
        levels = np.unique(values)
        factors.append(FactorInfo(name, len(levels), tuple(str(v) for v in levels)))
        labels.append(np.searchsorted(levels, values))
    labels = np.stack(labels, 1)
    crop = float(opts["crop"])
    if not 0 < crop <= 1:
        raise DataError(f"{NAME}: crop must be in (0, 1], got {crop}")
    h, w, _ = _images.peek(files[0])
    size = int(opts["image_size"] or DEFAULT_IMAGE_SIZE)
    is_test = test_mask(len(files), float(opts["test_portion"]), int(opts["seed"]))
    tasks = [{"files": [str(p) for p in files[a:b]], "labels": labels[a:b], "test": is_test[a:b],
              "start": a, "size": size, "crop": crop, "expect": (h, w, CHANNELS)}
             for a, b in ranges(len(files), int(opts["chunk_size"]))]
    return SourcePlan(NAME, factors, CHANNELS, size, None, tasks, read, opts,
                      {"rendered_chairs": tree_fingerprint(root, files)})


def read(task: dict) -> Iterator[Chunk]:
    # resize=True: every render is cropped and resized anyway; sizes must still agree
    # square="crop": the renders are square; should one not be, its centred square is framed
    images = np.stack([_images.load_image(Path(p), task["expect"], task["size"], True, task["crop"],
                                          square="crop")
                       for p in task["files"]])
    n = len(images)
    yield Chunk(np.where(task["test"], TEST, TRAIN).astype(np.int8),
                task["start"] + np.arange(n, dtype=np.int64), images, task["labels"],
                str(Path(task["files"][0]).parent.parent.parent))
