"""Built-in datasets generated straight into memory (no files), for tests and
quick runs: the sources that set ``IN_MEMORY`` (``digits``, ``shapes3d``,
``sprites``, ``sprites_full``).

Same drawing, ids and seeded splits (validation carved from train by id,
``splits.val_rows``) as preparing them to disk; rendering is vectorised over
chunks of 2,048 images.
"""
from __future__ import annotations

import numpy as np

from ..base import InMemoryDataset
from ..errors import DataError
from ._common import TEST, TRAIN, VAL, carve_val
from . import SOURCES, get_source, make_plan


def is_builtin(name: str) -> bool:
    """Whether source ``name`` is generated in memory (its module sets ``IN_MEMORY``)."""
    return bool(getattr(SOURCES.get(name), "IN_MEMORY", False))


BUILTIN = tuple(name for name in SOURCES if is_builtin(name))


def sample_count(name: str, num_samples: int | None) -> int | None:
    """How many images of built-in dataset ``name`` a config means: ``num_samples``, or
    for None the source's ``DEFAULT_SAMPLES`` (None: all of its images). The one rule for
    the single-process runner and the Ray pipeline, so that one config trains on the same
    data in both."""
    return get_source(name).DEFAULT_SAMPLES if num_samples is None else num_samples


def load_builtin(name: str, image_size: int | None = None, num_samples: int | None = None, seed: int = 0,
                 test_portion: float = 0.1, val_portion: float = 0.1
                 ) -> tuple[InMemoryDataset, InMemoryDataset, InMemoryDataset]:
    """(train, val, test) in memory. images (N, C, S, S) uint8; labels (N, F) int64.

    image_size: None = the source's ``DEFAULT_IMAGE_SIZE``. num_samples: a seeded
    subset without repetition (distinct grid points of a procedural source);
    None = :func:`sample_count`'s default. val: the train rows
    whose ids ``splits.val_rows(ids, val_portion, seed)`` picks (about
    ``val_portion`` of them; empty only when it is 0). Train frequencies are
    measured; val and test carry the same table.
    """
    if not is_builtin(name):
        raise DataError(f"load_builtin: {name!r} is not built in; choose from {BUILTIN} "
                        f"(prepare other sources with pipelines/prepare_data.py)")
    plan = make_plan(name, {"image_size": image_size, "seed": seed, "test_portion": test_portion,
                            "val_portion": val_portion, "chunk_size": 2048,
                            "num_samples": sample_count(name, num_samples)})
    chunks = [c for t in plan.tasks for c in plan.read(t)]
    split = np.concatenate([c.split for c in chunks])
    ids = np.concatenate([c.ids for c in chunks])
    images = np.concatenate([c.images for c in chunks]).transpose(0, 3, 1, 2)
    labels = np.concatenate([c.labels for c in chunks])
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
