"""The layers of docs/method.md section 5 written straight from their formulas,
differentiated by autograd, as a first implementation writes them.

``layers.py`` computes the same functions faster (fused weight norm, a
hand-written SNPReLU backward, activation shifts folded into biases, strided
pooling, a sub-pixel final layer). ``tests/test_perf_equivalence.py`` checks
the fast layers against these formulas, and ``benchmarks/naive.py`` runs the
networks with them (``straightforward_layers``) as the baseline the stage
throughput is compared with. Not used in training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def weight_norm(weight: Tensor, unit_dim: int, scale: Tensor | None, gain: float) -> Tensor:
    """``weight`` with every slice along ``unit_dim`` at norm ``gain * scale``."""
    dims = tuple(d for d in range(weight.dim()) if d != unit_dim)
    norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    shape = [1] * weight.dim()
    shape[unit_dim] = -1
    factor = gain / norm
    if scale is not None:
        factor = factor * scale.view(shape)
    return weight * factor


def snprelu(x: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """``(prelu(x + b; a) - mean) / std`` per channel (dim 1), with the analytic
    moments of ``prelu(z + b; a)`` for ``z ~ N(0, 1)``."""
    cdf = 0.5 * (1.0 + torch.erf(b / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)
    pos_mean = b * cdf + pdf
    pos_sq = (b * b + 1.0) * cdf + b * pdf
    mean = pos_mean + a * (b - pos_mean)
    var = pos_sq + a * a * (b * b + 1.0 - pos_sq) - mean * mean
    std = var.clamp_min(1e-8).sqrt()
    view = [1, -1] + [1] * (x.dim() - 2)
    return (F.prelu(x + b.view(view), a) - mean.view(view)) / std.view(view)


def residual_add(shortcut: Tensor, residual: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``alpha * shortcut + beta * residual`` with ``(alpha, beta)`` per channel
    rescaled to ``alpha^2 + beta^2 = 1``."""
    norm = torch.sqrt(alpha * alpha + beta * beta).clamp_min(1e-12)
    view = [1, -1] + [1] * (shortcut.dim() - 2)
    return (alpha / norm).view(view) * shortcut + (beta / norm).view(view) * residual


def upsample_2x(x: Tensor, crop: int = 0) -> Tensor:
    """Nearest 2x upsampling of ``x: (B, C, H, W)``, cropped by ``crop`` per side."""
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    return up[:, :, crop:-crop, crop:-crop] if crop else up
