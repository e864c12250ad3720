"""The reference path: the layers of docs/method.md section 5 written straight
from their formulas and differentiated by autograd, as a first implementation
writes them.

``layers.py`` is the fast path: the same functions computed faster (fused
weight norm, a hand-written SNPReLU backward and, on CPU, C kernels,
activation shifts folded into biases, strided pooling, a sub-pixel final
layer). The networks and the stages are written once, against ``layers.py``;
``dsu_models.nn.reference.plain_layers`` runs them on the formulas here
instead, with the same parameters (it lives apart so that this module, which
``layers.py`` imports, imports no network code). ``tests/test_perf_equivalence.py`` checks the fast path against
this one, and ``benchmarks/stage_throughput.py`` times it as the baseline.
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


VAR_FLOOR = 1e-8


def prelu_moments(b: Tensor, a: Tensor) -> dict[str, Tensor]:
    """The analytic moments of ``y = prelu(t; a)``, ``t = z + b``, ``z ~ N(0, 1)``,
    per channel: ``mean``, ``var``, ``std``, and the pieces their derivatives use.

    With ``t+ = max(t, 0)``, ``t- = min(t, 0)``, ``Phi``/``phi`` the standard
    normal cdf/pdf: ``E[t+] = b Phi(b) + phi(b)``, ``E[t+^2] = (b^2 + 1) Phi(b) +
    b phi(b)``, ``E[t-] = b - E[t+]``, ``E[t-^2] = b^2 + 1 - E[t+^2]``; since
    ``t+ t- = 0``, ``E[y] = E[t+] + a E[t-]`` and ``E[y^2] = E[t+^2] + a^2 E[t-^2]``.
    The only place these are written (the C kernels in ``native_kernels.c``
    compute the same and are tested against this)."""
    cdf = 0.5 * (1.0 + torch.erf(b / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)
    pos_mean = b * cdf + pdf
    pos_sq = (b * b + 1.0) * cdf + b * pdf
    neg_mean = b - pos_mean
    neg_sq = b * b + 1.0 - pos_sq
    mean = pos_mean + a * neg_mean
    var = pos_sq + a * a * neg_sq - mean * mean
    # var -> 0 only for a ~ 0 and b << 0 (a dead unit); keep the division finite.
    std = var.clamp_min(VAR_FLOOR).sqrt()
    return dict(cdf=cdf, pos_mean=pos_mean, neg_mean=neg_mean, neg_sq=neg_sq,
                mean=mean, var=var, std=std)


def snprelu(x: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """``(prelu(x + b; a) - mean) / std`` per channel (dim 1), with the analytic
    moments of ``prelu(z + b; a)`` for ``z ~ N(0, 1)``."""
    m = prelu_moments(b, a)
    view = [1, -1] + [1] * (x.dim() - 2)
    return (F.prelu(x + b.view(view), a) - m["mean"].view(view)) / m["std"].view(view)


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


def avg_pool_2x2(x: Tensor, pad: int = 0) -> Tensor:
    """2x2 average pooling after zero padding by ``pad`` per side."""
    return F.avg_pool2d(x, 2, padding=pad, count_include_pad=True)


# ----------------------------------------------------------------- the switch
