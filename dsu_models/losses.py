"""Training losses (docs/method.md sections 6 and 8).

All functions return scalars averaged over the batch unless stated otherwise.
Which parameters a loss updates is decided by the stage that calls it (what it
detaches and which optimizer steps); these functions only compute values.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_CLAMP = math.log(1e-8)


def reconstruction_nll(x_hat: Tensor, x: Tensor, noise_std: Tensor) -> Tensor:
    """Gaussian NLL with a predicted scalar noise std per image.

    x_hat, x: ``(B, C, H, W)`` (any ``(B, ...)``); noise_std: ``(B,)`` or ``(B, 1)``.
    Per image ``mean_pixels((x_hat - x)^2) / (2 s^2) + log s + 0.5 log(2 pi)``,
    i.e. the per-pixel NLL averaged over pixels; then the batch mean.
    """
    s = noise_std.reshape(-1)
    mse = (x_hat - x).square().flatten(1).mean(dim=1)
    return (mse / (2.0 * s.square()) + torch.log(s) + _HALF_LOG_2PI).mean()


def _pick(values: Tensor, labels: Tensor) -> Tensor:
    """``values[b, labels[b]]``: ``(B, n), (B,) -> (B,)``."""
    return values.gather(1, labels.unsqueeze(1)).squeeze(1)


def _log_one_minus(log_probs: Tensor, labels: Tensor) -> Tensor:
    """``log(1 - p(y))`` from normalised log-probabilities ``(B, n)``, as ``(B,)``.

    Computed as the logsumexp of the other classes' log-probabilities, which stays
    exact when ``p(y) -> 1`` (where ``log1p(-exp(log p))`` loses every digit).
    With a single class it is ``-inf``.
    """
    others = log_probs.masked_fill(
        F.one_hot(labels, log_probs.shape[1]).bool(), float("-inf")
    )
    return torch.logsumexp(others, dim=1)


def adversarial_nlu(log_probs: Tensor, labels: Tensor, freq: Tensor) -> Tensor:
    """Stage-1 ``nlu`` adversarial loss: ``-mean((1/f_y - 1) * log(1 - p(y)))``.

    log_probs: ``(B, n)`` classifier log-probabilities (normalised); labels: ``(B,)``
    true labels; freq: ``(n,)`` class frequencies. ``1 - p(y)`` is clamped at 1e-8
    inside the log (no gradient below the clamp). Minimised by the encoder side.
    """
    log_rest = _log_one_minus(log_probs, labels).clamp_min(_LOG_CLAMP)
    weight = 1.0 / freq.to(log_probs)[labels] - 1.0
    return -(weight * log_rest).mean()


def adversarial_ll(log_probs: Tensor, labels: Tensor) -> Tensor:
    """Stage-1 ``ll`` adversarial loss: ``mean(log p(y))`` (minimised by the encoder side)."""
    return _pick(log_probs, labels).mean()


def adversarial_prior(log_probs: Tensor, freq: Tensor) -> Tensor:
    """Stage-1 ``prior`` adversarial loss (beyond the method): ``mean_b KL(f || p_b)``,
    how far the classifier's prediction is from the class frequencies ``f``.

    log_probs: ``(B, n)`` normalised log-probabilities; freq: ``(n,)``. Zero only
    when C predicts the prior for every code, which a code that still carries the
    label cannot force on a C that keeps learning; ``nlu`` and ``ll`` are also
    minimised by a C that is confidently wrong, which a code that merely moves
    the label's information around achieves. Minimised by the encoder side.
    """
    f = freq.to(log_probs)
    entropy = -(f * f.clamp_min(1e-12).log()).sum()
    return -(log_probs * f).sum(1).mean() - entropy


def lsgan_real_loss(d_real: Tensor) -> Tensor:
    """Least-squares D loss of real images: ``mean((D(real) - 1)^2)``."""
    return (d_real - 1.0).square().mean()


def lsgan_fake_loss(d_fake: Tensor) -> Tensor:
    """Least-squares D loss of fakes: ``mean((D(fake) + 1)^2)``."""
    return (d_fake + 1.0).square().mean()


def lsgan_d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Least-squares D loss: ``mean((D(real) - 1)^2) + mean((D(fake) + 1)^2)``."""
    return lsgan_real_loss(d_real) + lsgan_fake_loss(d_fake)


def lsgan_g_loss(d_fake: Tensor) -> Tensor:
    """Least-squares generator loss: ``mean(D(fake)^2)``."""
    return d_fake.square().mean()


def classifier_nll(logits: Tensor, labels: Tensor, classes: int | None = None) -> Tensor:
    """Pre-training NLL: log-softmax over the first ``classes`` logits only.

    logits: ``(B, n)`` or ``(B, n + 1)`` (a stage-2 R head whose fake column is
    ignored); classes: n, default all columns; labels: ``(B,)`` in ``[0, n)``.
    """
    if classes is not None:
        logits = logits[:, :classes]
    return F.cross_entropy(logits, labels)


def cla2_real_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """R on real images: NLL of the true labels under the full ``(n + 1)``-way softmax."""
    return F.cross_entropy(logits, labels)


def cla2_fake_loss(logits: Tensor, target: Tensor) -> Tensor:
    """R on fakes: ``-mean(log(1 - p(target)))`` with the full ``(n + 1)``-way softmax.

    logits: ``(B, n + 1)``; target: ``(B,)`` labels the fakes were made with. Exact
    and stable (logsumexp of the other columns, which include the fake column).
    """
    return -_log_one_minus(F.log_softmax(logits, dim=1), target).mean()


def cla2_generator_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Generator vs R: NLL of the fakes' target labels under the full ``(n + 1)`` softmax."""
    return F.cross_entropy(logits, target)


def gaussian_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean_p, std_p^2) || N(mean_q, std_q^2))``, same shape as inputs."""
    ratio = (std_p / std_q).square()
    return 0.5 * (ratio + ((mean_p - mean_q) / std_q).square() - 1.0) - 0.5 * torch.log(ratio)


def labeled_encoder_loss(
    targets: Sequence[tuple[Tensor, Tensor]], predictions: Sequence[tuple[Tensor, Tensor]]
) -> Tensor:
    """``KL(B2(y) || S(x))`` summed over dims and factors, batch mean.

    targets: per factor ``(mean, std)`` ``(B, m_k)`` from the embedder ``B2``;
    predictions: per factor ``(mean, std)`` from the labeled encoder ``S``.
    """
    if len(targets) != len(predictions):
        raise ValueError(f"got {len(targets)} target codes but {len(predictions)} predictions")
    if not targets:
        raise ValueError("labeled_encoder_loss needs at least one factor")
    total = sum(
        gaussian_kl(mb, sb, ms, ss).sum(dim=1) for (mb, sb), (ms, ss) in zip(targets, predictions)
    )
    return total.mean()


def match_loss(mean_hat: Tensor, target_mean: Tensor, std_stat: Tensor) -> Tensor:
    """Stage-2 ``mse`` match: ``sum_j ((E(x_hat)_j - target_j) / std_j)^2``, batch mean.

    mean_hat: ``(B, m)`` frozen E's mean on the generated image; target_mean: ``(B, m)``
    the unknown code it was generated from; std_stat: ``(m,)`` stage-1 code std.
    """
    std = std_stat.to(mean_hat)
    return ((mean_hat - target_mean) / std).square().sum(dim=1).mean()
