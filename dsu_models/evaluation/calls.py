"""The model calls every evaluation makes, batched (the model is duck-typed ``DisUnknownModel``)."""
from __future__ import annotations

import torch
from torch import Tensor


def unknown_means(model, images: Tensor, batch_size: int) -> Tensor:
    """(N, m_u) unknown-code means of images (N, C, H, W), uint8 or float in [-1, 1], on the CPU."""
    parts = [model.encode_unknown(x).float().cpu() for x in images.split(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, model.unknown_size)


def generate(model, unknown: Tensor, labels: Tensor) -> Tensor:
    """One batch: G(unknown (B, m_u), label codes of labels (B, K)) -> (B, C, H, W) in [-1, 1], CPU."""
    codes = model.embed_labels(labels) if labels.shape[1] else []
    return model.generate(unknown, codes).float().cpu()
