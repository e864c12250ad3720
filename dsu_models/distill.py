"""Distilling the unknown after stage 1 (docs/method.md section 7, last paragraph).

After stage 1 the unknown encoder E encodes every train and test sample; the
per-sample Gaussians ``(mu_u, sigma_u)`` are the *distilled unknown* that stage 2
trains on, and their statistics over the train split (mean, total std, variance
ratio, eigen-decomposition of the std-normalised covariance; see
:func:`dsu_models.codes.code_statistics`) feed ``random_ucode`` sampling in stage 2
and the generated half of the labeled-encoder stage.

Choices where docs/method.md is silent:

- Codes are stored as float32 on the CPU, one row per sample, with the split's
  stable ``ids`` beside them, so a later stage can join codes to samples by id
  whatever order it reads the data in.
- The statistics are accumulated in float64 from the *stored* float32 codes, chunk
  by chunk while encoding (:class:`~dsu_models.codes.CodeStatsAccumulator`), so they
  are exactly the statistics of what stage 2 reads, and the full float64 copy of
  the codes is never materialised.
- ``unknown_size`` 0 (all factors labeled): there is nothing to encode. Pass
  ``encoder=None`` (or an encoder whose code size is 0); the network is not run and
  every split gets ``(N, 0)`` codes; the statistics are the (empty, shape ``(0,)``
  and ``(0, 0)``) tensors the accumulator gives for ``m = 0``.
- Encoding runs in eval mode under ``torch.no_grad``; the encoder's previous
  train/eval mode is restored afterwards.
- Images are encoded in batches of :func:`distill_batch_size` (four stage-1
  batches) in every runner: the single-process runner, the Ray actors and
  stage 1's own code plots all go through :func:`encode_images`.
- The file written by :func:`save_codes` holds only plain tensors in nested dicts,
  so :func:`load_codes` reads it with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from dsu_models.codes import CodeStatsAccumulator
from dsu_models.config import Config
from dsu_models.data.base import InMemoryDataset, to_float
from dsu_models.files import load_torch, save_torch

ImageSource = Tensor | Iterable[Tensor]


def image_batches(images: ImageSource, batch_size: int,
                  device: torch.device | str) -> Iterator[Tensor]:
    """Float batches ``(b, C, H, W)`` in [-1, 1] on ``device``.

    images: a ``(N, C, H, W)`` tensor (uint8 in [0, 255], or float in [-1, 1]), split
    into batches of ``batch_size``; or an iterable of such batches, taken as they
    come. uint8 batches are moved to ``device`` first and converted there (4x less
    to transfer than floats).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunks = images.split(batch_size) if isinstance(images, Tensor) else images
    for chunk in chunks:
        chunk = chunk.to(device, non_blocking=True)
        yield to_float(chunk) if chunk.dtype == torch.uint8 else chunk


def _code_size(encoder: nn.Module | None) -> int:
    if encoder is None:
        return 0
    sizes = list(encoder.code_sizes)
    if len(sizes) != 1:
        raise ValueError(f"the unknown encoder must have one code part, got sizes {sizes}")
    return int(sizes[0])


def _count(images: ImageSource) -> int:
    if isinstance(images, Tensor):
        return int(images.shape[0])
    return sum(int(batch.shape[0]) for batch in images)


@torch.no_grad()
def encode_images(encoder: nn.Module | None, images: ImageSource, batch_size: int,
                   device: torch.device | str,
                   accumulator: CodeStatsAccumulator | None = None) -> tuple[Tensor, Tensor]:
    """Encode images with the unknown encoder E: ``(mu (N, m), sigma (N, m))``, float32, CPU.

    images: see :func:`image_batches`. ``encoder`` is an ``Encoder`` with one code
    part of size m, already on ``device`` (or None for ``m = 0``). With ``accumulator``, every batch's codes
    are also fed into it (the float32 values that are returned).
    """
    m = _code_size(encoder)
    if m == 0:
        n = _count(images)
        empty = torch.zeros(n, 0)
        if accumulator is not None:
            accumulator.update(empty, empty)
        return empty, empty.clone()
    was_training = encoder.training
    encoder.eval()
    mus, sigmas = [], []
    try:
        for x in image_batches(images, batch_size, device):
            ((mu, sigma),) = encoder(x)
            mu, sigma = mu.float().cpu(), sigma.float().cpu()
            if accumulator is not None:
                accumulator.update(mu, sigma)
            mus.append(mu)
            sigmas.append(sigma)
    finally:
        encoder.train(was_training)
    if not mus:
        return torch.zeros(0, m), torch.zeros(0, m)
    return torch.cat(mus), torch.cat(sigmas)


def distill_batch_size(cfg: Config) -> int:
    """Images per encoding batch: four stage-1 training batches (no gradients are kept)."""
    return 4 * cfg.stage1.batch_size


def stage1_encoder(cfg: Config, handoff: dict, device: torch.device | str) -> nn.Module | None:
    """Stage 1's unknown encoder E from its hand-off, on ``device`` in eval mode
    (None when the config has no unknown code)."""
    if not cfg.unknown_size:
        return None
    from dsu_models.nn.builders import build_encoder
    encoder = build_encoder(cfg, [cfg.unknown_size], cfg.stage1.zero_init)
    encoder.load_state_dict(handoff["weights"]["encoder"])
    return encoder.to(device).eval()


def distill_stage1(cfg: Config, handoff: dict, splits: dict[str, InMemoryDataset],
                   device: torch.device | str) -> dict:
    """The distill step in one process: :func:`distill` with stage 1's E."""
    return distill(stage1_encoder(cfg, handoff, device), splits, distill_batch_size(cfg), device)


def distill(encoder: nn.Module | None, splits: dict[str, InMemoryDataset], batch_size: int,
            device: torch.device | str) -> dict:
    """Encode every split and compute the train split's code statistics.

    splits: ``{"train": ..., "test": ..., ...}``; ``"train"`` is required (the
    statistics describe it) and must not be empty. Returns::

        {"codes": {split: {"ids": int64 (N,), "mu": float32 (N, m), "sigma": float32 (N, m)}},
         "stats": {"mean", "std", "variance_ratio", "eigenvalues", "eigenvectors"}}  # float64

    """
    if "train" not in splits:
        raise ValueError(f"distill needs a 'train' split for the statistics, got {sorted(splits)}")
    if len(splits["train"]) == 0:
        raise ValueError("distill: the train split is empty; there is nothing to take statistics of")
    codes = {}
    accumulator = CodeStatsAccumulator()
    for name, data in splits.items():
        mu, sigma = encode_images(encoder, data.images, batch_size, device,
                                   accumulator=accumulator if name == "train" else None)
        codes[name] = {"ids": data.ids.detach().to("cpu", torch.int64).clone(), "mu": mu, "sigma": sigma}
    return {"codes": codes, "stats": {k: v.cpu() for k, v in accumulator.finalize().items()}}


def save_codes(result: dict, path: str | Path) -> Path:
    """Write a :func:`distill` result atomically (temp name in the same folder, then rename)."""
    return save_torch(result, path)


def load_codes(path: str | Path, map_location: torch.device | str = "cpu") -> dict:
    """Read a file written by :func:`save_codes` (``weights_only=True``: tensors and dicts only)."""
    return load_torch(path, map_location)
