"""Resumable in-memory batches for the single-process runner.

The batch order is a pure function of ``(seed, iteration)``: epoch ``e`` is a
permutation drawn from ``seed + e``, so a resumed run sees exactly the batches
an uninterrupted run would have seen, with no loader state to checkpoint.
Images stay uint8 in memory and become ``[-1, 1]`` floats one batch at a time.
"""
from __future__ import annotations

import torch

from dsu_models.config import Config
from dsu_models.data.base import FactorInfo, InMemoryDataset, to_float


def labeled_view(cfg: Config, data: InMemoryDataset) -> tuple[torch.Tensor, list[FactorInfo]]:
    """Labels (N, K) and infos of the config's labeled factors, in config order."""
    columns = [data.factor_index(name) for name in cfg.labeled_factors]
    labels = data.labels[:, columns] if columns else torch.zeros(len(data), 0, dtype=torch.int64)
    return labels, [data.factors[j] for j in columns]


class BatchSource:
    """``batch(iteration) -> {"image", "labels"[, "mu", "sigma"]}`` (CPU tensors).

    ``codes``: optional ``{"mu", "sigma"}`` (N, m) aligned with ``data`` rows
    (stage 2 joins the distilled unknown codes to their images).
    """

    def __init__(self, cfg: Config, data: InMemoryDataset, batch_size: int, seed: int,
                 codes: dict | None = None):
        if len(data) < batch_size:
            raise ValueError(f"{data.name}: {len(data)} training images, fewer than the batch "
                             f"size {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.labels, self.factors = labeled_view(cfg, data)
        self.codes = codes
        self.per_epoch = len(data) // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, iteration: int) -> torch.Tensor:
        epoch, step = divmod(iteration, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.data), generator=g), epoch
        return self._perm[step * self.batch_size:(step + 1) * self.batch_size]

    def batch(self, iteration: int) -> dict:
        index = self.indices(iteration)
        out = {"image": to_float(self.data.images[index]), "labels": self.labels[index]}
        if self.codes is not None:
            out["mu"] = self.codes["mu"][index]
            out["sigma"] = self.codes["sigma"][index]
        return out
