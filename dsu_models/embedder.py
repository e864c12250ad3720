"""Label embedder: class -> normalised Gaussian code (docs/method.md section 4).

Each labeled factor k has one :class:`LabelEmbedder` ``B_k`` holding, per class, a
mean vector and a log-std vector. Its outputs are renormalised at every call so
that the class mixture, weighted by the class frequencies ``f``, has zero mean and
unit variance in every dimension; the raw parameters are therefore only defined up
to an affine map per dimension.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dsu_models.codes import KeepProb, keep_weighted_sum, kl_to_prior

INITS = ("zero", "linear", "circle")


class LabelEmbedder(nn.Module):
    """Per-class Gaussian codes of one labeled factor.

    classes: number of classes n (>= 1); size: code size m (>= 0).
    init: ``"zero"`` (default: every mean 0 and log-std 0, so all classes start with
    the same output N(0, 1) and separate under training), ``"linear"`` (dim 0 means
    ``-1 + 1/n ... 1 - 1/n`` evenly spaced, dim 0 log-std ``log(1/n)``, other dims
    zero), or ``"circle"`` (dims 0, 1 at ``(cos, sin)(2 pi c / n)``, their log-std
    ``log(sin(pi/n))``, other dims zero; needs ``size >= 2`` and ``classes >= 2``).
    frequencies: ``(n,)`` class frequencies (or counts); default uniform. Stored as
    the buffer ``frequencies`` (in ``state_dict``), normalised to sum to 1.

    Parameters: ``mean`` and ``log_std``, both ``(n, m)``.
    """

    def __init__(
        self,
        classes: int,
        size: int,
        init: str = "zero",
        frequencies: Tensor | None = None,
    ) -> None:
        super().__init__()
        if classes < 1:
            raise ValueError(f"LabelEmbedder needs classes >= 1, got {classes}")
        if size < 0:
            raise ValueError(f"LabelEmbedder needs size >= 0, got {size}")
        if init not in INITS:
            raise ValueError(f"unknown label embedder init {init!r}; choose one of {INITS}")
        self.classes = classes
        self.size = size
        self.init = init
        mean, log_std = _initial_values(classes, size, init)
        self.mean = nn.Parameter(mean)
        self.log_std = nn.Parameter(log_std)
        self.register_buffer("frequencies", torch.full((classes,), 1.0 / classes))
        if frequencies is not None:
            self.update_frequencies(frequencies)

    def extra_repr(self) -> str:
        return f"classes={self.classes}, size={self.size}, init={self.init!r}"

    @torch.no_grad()
    def update_frequencies(self, freq: Tensor) -> None:
        """Replace the class frequencies. freq: ``(n,)`` non-negative, any positive sum."""
        freq = torch.as_tensor(freq, dtype=self.frequencies.dtype, device=self.frequencies.device)
        if freq.shape != (self.classes,):
            raise ValueError(f"frequencies must have shape ({self.classes},), got {tuple(freq.shape)}")
        if bool((freq < 0).any()) or not float(freq.sum()) > 0:
            raise ValueError("frequencies must be non-negative with a positive sum")
        self.frequencies.copy_(freq / freq.sum())

    def normalized(self) -> tuple[Tensor, Tensor]:
        """Normalised per-class codes ``(means (n, m), stds (n, m))``.

        ``M = sum_c f_c mean_c``, ``V = sum_c f_c (mean_c - M)^2 + sum_c f_c std_c^2``
        (equal to docs/method.md's ``sum f mean^2 - M^2 + ...`` but free of cancellation),
        clamped at 1e-8; output ``((mean_c - M) / sqrt(V), std_c / sqrt(V))``.
        """
        f = self.frequencies.to(self.mean.dtype).unsqueeze(1)
        std = self.log_std.exp()
        centre = (f * self.mean).sum(dim=0)
        centred = self.mean - centre
        var = (f * centred.square()).sum(dim=0) + (f * std.square()).sum(dim=0)
        scale = var.clamp_min(1e-8).rsqrt()
        return centred * scale, std * scale

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """labels: ``(B,)`` int64 -> ``(mean (B, m), std (B, m))``."""
        means, stds = self.normalized()
        return means[labels], stds[labels]

    def code_loss(self, keep_prob: KeepProb = None) -> Tensor:
        """``sum_c f_c KL(output_c || N(0, 1))`` per dim, keep-prob weighted, summed (scalar)."""
        means, stds = self.normalized()
        f = self.frequencies.to(means.dtype).unsqueeze(1)
        return keep_weighted_sum((f * kl_to_prior(means, stds)).sum(dim=0), keep_prob)


def _initial_values(classes: int, size: int, init: str) -> tuple[Tensor, Tensor]:
    """Initial ``(mean, log_std)``, both ``(classes, size)``, for one init option."""
    mean = torch.zeros(classes, size)
    log_std = torch.zeros(classes, size)
    if init == "linear":
        if size < 1:
            raise ValueError(f"'linear' init needs a factor size >= 1, got size {size}")
        half = 1.0 - 1.0 / classes
        mean[:, 0] = torch.linspace(-half, half, classes)
        log_std[:, 0] = math.log(1.0 / classes)
    elif init == "circle":
        if size < 2:
            raise ValueError(f"'circle' init needs a factor size >= 2, got size {size}")
        if classes < 2:
            raise ValueError(f"'circle' init needs at least 2 classes, got {classes}")
        angle = 2.0 * math.pi * torch.arange(classes, dtype=torch.float64) / classes
        mean[:, 0] = torch.cos(angle).float()
        mean[:, 1] = torch.sin(angle).float()
        log_std[:, :2] = math.log(math.sin(math.pi / classes))
    return mean, log_std


@torch.no_grad()
def nearest_class(embedder: LabelEmbedder, mean: Tensor) -> Tensor:
    """Class whose normalised embedding mean is nearest (Euclidean) to each row.

    mean: ``(B, m)`` code means (e.g. the labeled encoder's output) -> ``(B,)`` int64.
    """
    centres, _ = embedder.normalized()
    centres = centres.to(mean.dtype)
    # |a - b|^2 = |a|^2 - 2 a.b + |b|^2 without a (B, n, m) intermediate; |a|^2 is
    # constant per row and irrelevant to the argmin.
    dist = centres.square().sum(dim=1).unsqueeze(0) - 2.0 * mean @ centres.T
    return dist.argmin(dim=1)
