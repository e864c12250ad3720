"""The decode step Ray Data runs in its worker processes (``map_batches``).

Kept free of torch (numpy, PIL and ``dsu_models.data.codec`` only): Ray ships
``Decode`` to its workers by module reference, so each worker imports this
module, and torch would add about 0.3 GiB to every one of them.
"""
from __future__ import annotations

import numpy as np

from dsu_models.data.codec import decode_batch, resize_batch


class Decode:
    """A batch of prepared rows -> ``id`` (n,) int64, ``image`` (n, C, S, S)
    uint8 at ``size``, ``labels`` (n, F) int64 in ``factors`` order.

    Images stay uint8 on their way through the object store and into the
    training worker (a quarter of float32's bytes in every buffer and in the
    worker's epoch cache); the consumer maps them to [-1, 1]
    (``dsu_models.data.to_float``)."""

    def __init__(self, channels: int, size: int, factors: list[str], keep=None):
        """keep: None, or ``ids (n,) -> (n,) bool`` choosing the rows to return
        (``dsu_models.data.splits.RowFilter``: an old dataset's train or val);
        applied before decoding, so a dropped row costs no PNG decode."""
        self.channels, self.size, self.factors, self.keep = channels, size, factors, keep

    def __call__(self, batch: dict) -> dict:
        if self.keep is not None:
            mask = self.keep(batch["id"])
            batch = {k: v[mask] for k, v in batch.items()}
        if not len(batch["id"]):
            return {"id": np.zeros(0, np.int64),
                    "image": np.zeros((0, self.channels, self.size, self.size), np.uint8),
                    "labels": np.zeros((0, len(self.factors)), np.int64)}
        images = resize_batch(decode_batch(batch["image"], self.channels), self.size)
        return {"id": batch["id"].astype(np.int64),
                "image": np.ascontiguousarray(images, dtype=np.uint8),
                "labels": np.stack([batch[f] for f in self.factors], 1).astype(np.int64)}
