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
    ``pinned`` (for a CUDA stage): the batch stays uint8 (a quarter of the bytes
    of float32) in page-locked memory, so the stage's copy to the GPU does not
    block the host and the conversion to [-1, 1] runs on the GPU
    (``Stage.to_device``).
    """

    def __init__(self, cfg: Config, data: InMemoryDataset, batch_size: int, seed: int,
                 codes: dict | None = None, pinned: bool = False):
        if len(data) < batch_size:
            raise ValueError(f"{data.name}: {len(data)} training images, fewer than the batch "
                             f"size {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.labels, self.factors = labeled_view(cfg, data)
        self.codes, self.pinned = codes, pinned
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
        images = self.data.images[index]
        out = {"image": images if self.pinned else to_float(images), "labels": self.labels[index]}
        if self.codes is not None:
            out["mu"] = self.codes["mu"][index]
            out["sigma"] = self.codes["sigma"][index]
        if self.pinned:
            # PyTorch's caching host allocator reuses a page-locked block only
            # once the copy that read it has finished
            out = {k: v.pin_memory() for k, v in out.items()}
        return out
