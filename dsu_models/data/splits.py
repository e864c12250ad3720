"""The validation split: which rows are carved from train, and how a split's rows are found.

A prepared dataset has the splits ``train``, ``val`` and ``test`` (and the
``plot`` subset of test). Unless a source supplies validation rows itself
(an image-folder CSV whose ``split`` column says ``val``), ``val`` is carved
from the rows the source put in train by :func:`val_rows`: a seeded hash of
each row's id, so the rule needs no state, gives the same answer in every
process and chunk, and can filter rows where they are streamed (Ray Data).

Datasets prepared before validation splits existed have no ``val`` in their
manifest. They keep loading: ``val`` is then carved on the fly from their
train files with the same rule at :data:`LEGACY_VAL_PORTION` (the option's
default, so preparing such a dataset again with the defaults makes the very
same split permanent), and ``train`` is what is left. :func:`row_filter` says
which rows of the stored files a split keeps; :func:`split_rows` gives a
split's row count for sizing.

numpy only: Ray Data's decode workers import this module (pipelines/data/decode.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError

LEGACY_VAL_PORTION = 0.1
# mixes the seed so that the val rule is not correlated with any other seeded choice
_SALT = np.uint64(0x7A1D_5EED_0F0F_A11D)
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    return x ^ (x >> np.uint64(31))


def val_rows(ids: np.ndarray, portion: float, seed: int) -> np.ndarray:
    """Which rows are validation rows: (n,) bool for ids (n,) int64.

    Row ``i`` is a validation row iff a seeded 64-bit hash of ``ids[i]``, read
    as a number in [0, 1), is below ``portion``; about ``portion`` of any large
    set of ids, the same answer for an id wherever it is asked.
    """
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)   # two's complement for negatives
    key = _mix64(np.array([int(seed) % 2 ** 64], np.uint64) ^ _SALT)
    with np.errstate(over="ignore"):
        h = _mix64(_mix64(ids + _GOLDEN) ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2 ** 53)
    return u < float(portion)


def is_legacy(manifest: dict) -> bool:
    """Prepared before validation splits: the manifest has no ``val`` split."""
    return "val" not in manifest["splits"]


@dataclass(frozen=True)
class RowFilter:
    """Rows of an old dataset's train files that one split keeps (picklable).

    ``val``: keep the carved rows (the ``val`` split) or the others (``train``)."""

    portion: float
    seed: int
    val: bool

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids: (n,) int64 -> (n,) bool, True for rows the split keeps."""
        return val_rows(ids, self.portion, self.seed) == self.val


def row_filter(manifest: dict, split: str) -> RowFilter | None:
    """The filter that ``split`` applies to the files it is stored in; None when
    every row of them belongs to it (every split of a dataset prepared with ``val``)."""
    if not is_legacy(manifest) or split not in ("train", "val"):
        return None
    seed = int((manifest.get("options") or {}).get("seed", 0))
    return RowFilter(LEGACY_VAL_PORTION, seed, split == "val")


def stored_split(manifest: dict, split: str) -> str:
    """The folder that holds ``split``'s rows (``train`` for an old dataset's ``val``)."""
    return "train" if split == "val" and is_legacy(manifest) else split


def split_rows(manifest: dict, split: str) -> int:
    """Rows of ``split``: exact from the manifest, or for an old dataset's
    ``train`` and ``val`` the carved share of its train rows (an estimate: the
    hash carves about, not exactly, :data:`LEGACY_VAL_PORTION`)."""
    splits = manifest["splits"]
    name = stored_split(manifest, split)
    if name not in splits:
        raise DataError(f"no split {split!r}; splits are {available_splits(manifest)}")
    rows = int(splits[name]["rows"])
    f = row_filter(manifest, split)
    if f is None:
        return rows
    share = f.portion if f.val else 1.0 - f.portion
    return int(round(rows * share))


def has_val(manifest: dict) -> bool:
    """Whether the dataset has validation rows to read (carved on the fly for an
    old dataset; none for one prepared with ``val_portion=0``)."""
    return is_legacy(manifest) or int(manifest["splits"]["val"]["rows"]) > 0


def available_splits(manifest: dict) -> list[str]:
    """The split names a dataset answers to (an old one's ``val`` included)."""
    names = set(manifest["splits"])
    if is_legacy(manifest) and "train" in names:
        names.add("val")
    return sorted(names)
