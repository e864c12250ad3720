"""Built-in datasets generated straight into memory (no files): ``shapes3d``,
``sprites`` and ``digits``, for tests and quick runs.

Same drawing, ids and seeded splits (validation carved from train by id,
``splits.val_rows``) as preparing them to disk; rendering is vectorised over
chunks of 2,048 images.
"""
from __future__ import annotations

import numpy as np

from ..base import InMemoryDataset
from ..errors import DataError
from ._common import TEST, TRAIN, VAL, carve_val, test_mask
from . import make_plan

BUILTIN = ("shapes3d", "sprites", "sprites_full", "digits")
# the same counts as the datasets' config defaults (configs/datasets/*.yaml
# ``num_samples``; tests/test_data_sources.py checks they agree)
DEFAULT_SAMPLES = {"shapes3d": 20_000, "sprites": 20_000, "sprites_full": 40_000}


def sample_count(name: str, num_samples: int | None) -> int | None:
    """How many images of a built-in procedural dataset a config means: ``num_samples``,
    or for None :data:`DEFAULT_SAMPLES` capped at the factor grid; None for ``digits``
    (all of its images). The one rule for the single-process runner and the Ray pipeline,
    so that one config trains on the same data in both."""
    if name == "digits":
        return None
    if num_samples is not None:
        return num_samples
    from . import SOURCES

    return min(DEFAULT_SAMPLES[name], int(np.prod([c for _, c in SOURCES[name].FACTORS])))


def load_builtin(name: str, image_size: int | None = None, num_samples: int | None = None, seed: int = 0,
                 test_portion: float = 0.1, val_portion: float = 0.1
                 ) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset]:
    """(train, val, test) in memory. images (N, C, S, S) uint8; labels (N, F) int64.

    image_size: None = the source's default (64 px for sprites_full, 32 px for
    the others). num_samples: None = :data:`DEFAULT_SAMPLES` seeded distinct grid
    points (shapes3d, sprites, sprites_full; capped at the grid) or all 1,797
    digits; otherwise a seeded subset without repetition. val: the train rows
    whose ids ``splits.val_rows(ids, val_portion, seed)`` picks (about
    ``val_portion`` of them; empty only when it is 0). Train frequencies are
    measured; val and test carry the same table.
    """
    if name not in BUILTIN:
        raise DataError(f"load_builtin: {name!r} is not built in; choose from {BUILTIN} "
                        f"(prepare other sources with pipelines/prepare_data.py)")
    opts = {"image_size": image_size, "seed": seed, "test_portion": test_portion,
            "val_portion": val_portion, "chunk_size": 2048}
    if name != "digits":
        opts["num_samples"] = sample_count(name, num_samples)
    plan = make_plan(name, opts)
    chunks = [c for t in plan.tasks for c in plan.read(t)]
    split = np.concatenate([c.split for c in chunks])
    ids = np.concatenate([c.ids for c in chunks])
    images = np.concatenate([c.images for c in chunks]).transpose(0, 3, 1, 2)
    labels = np.concatenate([c.labels for c in chunks])
    if name == "digits" and num_samples is not None:
        if not 1 <= num_samples <= len(ids):
            raise DataError(f"digits: num_samples must be in [1, {len(ids)}], got {num_samples}")
        keep = np.sort(np.random.default_rng([seed, 0x6121D]).choice(len(ids), num_samples, replace=False))
        ids, images, labels = ids[keep], images[keep], labels[keep]
        split = np.where(test_mask(num_samples, test_portion, seed), TEST, TRAIN)
    split = carve_val(split, ids, float(val_portion), seed)

    import torch  # here, not at module level: preparation imports this package (see base.py)

    def part(code: int) -> InMemoryDataset:
        sel = split == code
        return InMemoryDataset(torch.from_numpy(np.ascontiguousarray(images[sel])),
                               torch.from_numpy(labels[sel]), plan.factors,
                               torch.from_numpy(ids[sel]), name)

    train = part(TRAIN).with_measured_frequencies()
    if len(train) == 0 or (split == TEST).sum() == 0 or (val_portion > 0 and (split == VAL).sum() == 0):
        raise DataError(f"{name}: {len(ids)} samples with test_portion {test_portion} and "
                        f"val_portion {val_portion} leave an empty split")
    val, test = part(VAL), part(TEST)
    return (train, InMemoryDataset(val.images, val.labels, train.factors, val.ids, name),
            InMemoryDataset(test.images, test.labels, train.factors, test.ids, name))
