"""Codes, sampling and nested dropout (docs/method.md section 3).

Every code is a diagonal Gaussian ``(mean, std)`` of shape ``(B, m)``. This module
holds the pieces shared by all stages:

- keep probabilities for nested dropout and the per-sample keep masks;
- stratified Gaussian noise and code sampling (dropped dims replaced by prior draws);
- the generator's input ``concat(codes..., 1 - masks...)``;
- the code (KL) loss and the batch loss;
- the code statistics computed after stage 1 (docs/method.md section 7), in float64 and
  in chunks, and sampling from the Gaussian they describe (stage 2 ``random_ucode``).

Choices where docs/method.md is silent are written in the docstrings below.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def keep_probabilities(dropout: list[float] | None, size: int) -> list[float] | None:
    """Per-dimension keep probabilities for a code of ``size`` dims (docs/method.md section 3).

    ``P = [1, q_1..q_t]``; if ``size <= len(P)`` take ``P[:size]``; otherwise keep
    ``P[:-1]`` and fill the remaining ``size - len(P) + 1`` dims by geometric
    interpolation from ``P[-2]`` to ``P[-1]``. ``None`` (no list) means no dropout.
    """
    if dropout is None or size == 0:
        return None
    p = [1.0] + [float(q) for q in dropout]
    if size <= len(p):
        return p[:size]
    fill = size - len(p) + 1
    ratio = (p[-1] / p[-2]) ** (1.0 / fill)
    out = p[:-1]
    for _ in range(fill):
        out.append(out[-1] * ratio)
    out[-1] = p[-1]  # exact end point, free of rounding drift
    return out


KeepProb = Tensor | Sequence[float] | None

# Uniforms are clamped to [_EPS, 1 - _EPS] before the inverse normal CDF, so no
# sample is infinite; |z| <= ndtri(1 - 1e-9) ~ 6.0. The clamp never moves a value
# out of its stratum while B < 1e9.
_EPS = 1e-9


def _as_keep_prob(keep_prob: KeepProb, like: Tensor) -> Tensor | None:
    """``keep_prob`` as a ``(m,)`` tensor on ``like``'s device and dtype (or None)."""
    if keep_prob is None:
        return None
    kp = torch.as_tensor(keep_prob, dtype=like.dtype, device=like.device)
    if kp.dim() != 1 or kp.shape[0] != like.shape[-1]:
        raise ValueError(
            f"keep_prob must have shape ({like.shape[-1]},), got {tuple(kp.shape)}"
        )
    return kp


def keep_weighted_sum(per_dim: Tensor, keep_prob: KeepProb) -> Tensor:
    """Sum a ``(m,)`` per-dimension loss, weighting each dim by its keep probability."""
    kp = _as_keep_prob(keep_prob, per_dim)
    return per_dim.sum() if kp is None else (per_dim * kp).sum()


# ---------------------------------------------------------------- sampling


def stratified_uniform(
    batch: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Stratified uniforms ``(batch, dim)`` in float64, strictly inside (0, 1).

    Per dimension, stratum ``[k/B, (k+1)/B)`` holds exactly one sample:
    ``u = (perm + U(0,1)) / B`` with an independent random permutation per column
    (``argsort`` of uniforms along the batch, no loop over dims). Always float64 so
    that ``perm + jitter`` cannot round up into the next stratum; callers cast.
    ``device`` defaults to the generator's device (else the default device).
    """
    if device is None and generator is not None:
        device = generator.device
    perm = torch.rand(batch, dim, generator=generator, device=device).argsort(dim=0)
    jitter = torch.rand(batch, dim, generator=generator, device=device, dtype=torch.float64)
    u = (perm.to(torch.float64) + jitter) / batch
    return u.clamp(_EPS, 1.0 - _EPS)


def stratified_normal(
    batch: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Stratified standard-normal noise ``(batch, dim)`` (docs/method.md section 3).

    ``ndtri`` of :func:`stratified_uniform`, evaluated in float64 and cast to
    ``dtype`` (default: torch's default dtype). Lower variance than ``randn`` for
    batch statistics; each column is still marginally N(0, 1).
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    u = stratified_uniform(batch, dim, generator=generator, device=device)
    return torch.special.ndtri(u).to(dtype)


def nested_dropout_mask(
    keep_prob: Tensor, batch: int, generator: torch.Generator | None = None,
    segment: Tensor | None = None, segments: int = 1,
) -> Tensor:
    """Nested-dropout keep mask ``(batch, m)``, float in {0, 1}.

    keep_prob: ``(m,)`` non-increasing, ``p_0 = 1``. One ``r ~ U(0,1)`` per sample;
    dim j is kept iff ``p_j >= r``, so the kept dims of a sample are always a
    prefix (nested). ``r`` is plain uniform, not stratified, as docs/method.md states.
    Several codes side by side (stage 2's ``[u, l_1..l_K]``): ``segment`` ``(m,)``
    gives each dim its code's index in ``[0, segments)``, and each code draws its
    own ``r`` (each keeps its own prefix).
    """
    dtype = keep_prob.dtype if keep_prob.is_floating_point() else torch.get_default_dtype()
    r = torch.rand(batch, segments, generator=generator, device=keep_prob.device, dtype=dtype)
    if segment is not None:
        r = r[:, segment]
    return (keep_prob.to(dtype).unsqueeze(0) >= r).to(dtype)


def sample_code(
    mean: Tensor,
    std: Tensor,
    keep_prob: KeepProb,
    training: bool,
    generator: torch.Generator | None = None,
    segment: Tensor | None = None,
    segments: int = 1,
) -> tuple[Tensor, Tensor]:
    """Sample a code with nested dropout. Returns ``(code, mask)``, both ``(B, m)``.

    mean, std: ``(B, m)``; keep_prob: ``(m,)`` or None (no dropout).
    ``code = mean + std * noise`` with stratified noise; where ``mask == 0`` the
    dim is replaced by an independent (stratified) prior draw from N(0, 1), so no
    gradient reaches the encoder through dropped dims. With ``training=False`` or
    ``keep_prob=None`` the mask is all ones. ``m = 0`` gives empty ``(B, 0)`` tensors.
    ``segment``/``segments``: several codes sampled in one draw, each with its own
    dropout level (:func:`nested_dropout_mask`).
    """
    batch, size = mean.shape
    noise_args = dict(generator=generator, device=mean.device, dtype=mean.dtype)
    code = torch.addcmul(mean, std, stratified_normal(batch, size, **noise_args))
    kp = _as_keep_prob(keep_prob, mean)
    if not training or kp is None or size == 0:
        return code, torch.ones_like(mean)
    mask = nested_dropout_mask(kp, batch, generator=generator, segment=segment, segments=segments)
    prior = stratified_normal(batch, size, **noise_args)
    return torch.where(mask.bool(), code, prior), mask


def generator_input(codes: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
    """The generator's input ``concat(codes..., 1 - masks...)``: ``(B, 2 * sum m)``.

    codes, masks: matching lists of ``(B, m_i)`` tensors (unknown code first, then
    the labeled factors in order, as the caller decides).
    """
    if len(codes) != len(masks):
        raise ValueError(f"got {len(codes)} codes but {len(masks)} masks")
    if not codes:
        raise ValueError("generator_input needs at least one code")
    return torch.cat(list(codes) + [1.0 - m for m in masks], dim=1)


# ---------------------------------------------------------------- losses on codes


def kl_to_prior(mean: Tensor, std: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean, std^2) || N(0, 1))``: ``0.5*(mu^2+sigma^2) - log sigma - 0.5``."""
    return 0.5 * (mean.square() + std.square()) - torch.log(std) - 0.5


def code_loss(mean: Tensor, std: Tensor, keep_prob: KeepProb) -> Tensor:
    """Code loss (scalar): per-dim KL to the prior, batch mean, keep-prob weighted, summed.

    mean, std: ``(B, m)``; keep_prob: ``(m,)`` or None (weights 1).
    """
    return keep_weighted_sum(kl_to_prior(mean, std).mean(dim=0), keep_prob)


def batch_loss(mean: Tensor, std: Tensor, keep_prob: KeepProb,
               reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Batch loss (scalar): KL of the batch's fitted ``N(bm, bv)`` to N(0, 1) per dim.

    ``bm`` = batch mean of ``mean``; ``bv`` = unbiased batch variance of ``mean`` +
    batch mean of ``std^2``; per dim ``0.5*(bm^2 + bv - log bv - 1)``, keep-prob
    weighted and summed. Choices: with B = 1 the variance of ``mean`` is taken as
    0 (the unbiased one is undefined); ``bv`` is clamped at 1e-8 before the log.

    ``reduce``: for a batch split over data-parallel workers, a sum over the
    workers that carries gradients (``pipelines.cluster.collective.sum_over_workers``):
    the statistics are then those of the global batch, from one reduction of
    the per-dim sums of ``mean``, ``mean^2`` and ``std^2`` and the row count.
    """
    if reduce is None:
        correction = 1 if mean.shape[0] > 1 else 0
        bm = mean.mean(dim=0)
        bv = mean.var(dim=0, correction=correction) + std.square().mean(dim=0)
    else:
        m = mean.shape[1]
        sums = reduce(torch.cat([mean.sum(0), mean.square().sum(0), std.square().sum(0),
                                 mean.new_full((1,), mean.shape[0])]))
        n = sums[3 * m]
        bm = sums[:m] / n
        scatter = (sums[m:2 * m] - n * bm.square()).clamp_min(0)
        bv = scatter / (n - 1).clamp_min(1) + sums[2 * m:3 * m] / n  # n = 1: variance 0, as above
    bv = bv.clamp_min(1e-8)
    return keep_weighted_sum(0.5 * (bm.square() + bv - torch.log(bv) - 1.0), keep_prob)


# ---------------------------------------------------------------- code statistics


class CodeStatsAccumulator:
    """Float64 running statistics of codes ``(mu, sigma)``, fed chunk by chunk.

    Keeps the count, the mean of ``mu``, the centred scatter matrix of ``mu`` (merged
    chunk-wise with Chan et al.'s parallel update, so N can be millions without
    cancellation) and the sum of ``sigma^2``. :meth:`finalize` gives the dict
    described in :func:`code_statistics`.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: Tensor | None = None
        self._scatter: Tensor | None = None
        self._var_sum: Tensor | None = None

    def update(self, mean_chunk: Tensor, std_chunk: Tensor) -> None:
        """Add a chunk. mean_chunk, std_chunk: ``(n, m)`` (any float dtype/device)."""
        mu = mean_chunk.detach().to(torch.float64)
        var = std_chunk.detach().to(torch.float64).square()
        if mu.dim() != 2 or mu.shape != var.shape:
            raise ValueError(f"expected two (n, m) tensors, got {tuple(mu.shape)} and {tuple(var.shape)}")
        n = mu.shape[0]
        if n == 0:
            return
        chunk_mean = mu.mean(dim=0)
        centred = mu - chunk_mean
        chunk_scatter = centred.T @ centred
        if self._mean is None:
            self.count, self._mean, self._scatter = n, chunk_mean, chunk_scatter
            self._var_sum = var.sum(dim=0)
            return
        if mu.shape[1] != self._mean.shape[0]:
            raise ValueError(f"code size changed from {self._mean.shape[0]} to {mu.shape[1]}")
        total = self.count + n
        delta = chunk_mean.to(self._mean.device) - self._mean
        self._scatter = (
            self._scatter
            + chunk_scatter.to(self._mean.device)
            + torch.outer(delta, delta) * (self.count * n / total)
        )
        self._mean = self._mean + delta * (n / total)
        self._var_sum = self._var_sum + var.sum(dim=0).to(self._mean.device)
        self.count = total

    def finalize(self) -> dict[str, Tensor]:
        """The statistics dict (float64 tensors); see :func:`code_statistics`."""
        if self._mean is None:
            raise ValueError("no samples were accumulated")
        n = self.count
        mean = self._mean
        cov_means = self._scatter / n  # population covariance of mu
        var_means = torch.diagonal(cov_means)
        mean_var = self._var_sum / n
        total_var = var_means + mean_var
        std = total_var.sqrt()
        safe_std = std.clamp_min(1e-12)
        ratio = var_means / total_var.clamp_min(1e-24)
        normalised = cov_means / torch.outer(safe_std, safe_std)
        normalised = normalised + torch.diag(mean_var / safe_std.square())
        eigenvalues, eigenvectors = _sorted_eigh(normalised)
        return {
            "mean": mean,
            "std": std,
            "variance_ratio": ratio,
            "eigenvalues": eigenvalues,
            "eigenvectors": eigenvectors,
        }


def _sorted_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues descending, clamped >= 0."""
    if matrix.shape[0] == 0:
        return matrix.new_zeros(0), matrix.new_zeros(0, 0)
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    order = torch.argsort(values, descending=True)
    return values[order].clamp_min(0.0), vectors[:, order]


def code_statistics(means: Tensor, stds: Tensor, chunk_size: int = 65536) -> dict[str, Tensor]:
    """Statistics of a set of codes, in float64 (docs/method.md section 7).

    means, stds: ``(N, m)`` per-sample code means and stds. The codes are seen as the
    mixture ``u ~ (1/N) sum_i N(mu_i, diag sigma_i^2)``. Returns (all float64):

    - ``mean`` ``(m,)``: mixture mean, the average of ``mu``;
    - ``std`` ``(m,)``: mixture std, ``sqrt(Var_i[mu_i] + mean_i[sigma_i^2])``;
    - ``variance_ratio`` ``(m,)``: ``Var_i[mu_i] / (Var_i[mu_i] + mean_i[sigma_i^2])``,
      the share of the total variance explained by the means (1: the dim is
      informative and precise; 0: the dim is pure noise, i.e. collapsed to the prior);
    - ``eigenvalues`` ``(m,)`` descending, ``eigenvectors`` ``(m, m)`` (columns): of the
      covariance of the std-normalised mixture ``z = (u - mean) / std``, i.e.
      ``Cov_i[mu_i]_jk / (std_j std_k) + delta_jk mean_i[sigma_ij^2] / std_j^2``
      (unit diagonal).

    All variances and covariances divide by N (population), not N - 1. Eigenvalues
    are clamped at 0 against round-off. The work is chunked through
    :class:`CodeStatsAccumulator`, which callers can also feed directly.
    """
    acc = CodeStatsAccumulator()
    for start in range(0, means.shape[0], chunk_size):
        acc.update(means[start:start + chunk_size], stds[start:start + chunk_size])
    return acc.finalize()


def sample_from_statistics(
    stats: dict[str, Tensor],
    batch: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw ``(batch, m)`` codes from the Gaussian fitted by :func:`code_statistics`.

    ``u = (noise * sqrt(eigval)) @ eigvec^T * std + mean`` with stratified noise,
    computed in float64 on the statistics' device and cast to ``dtype`` (default:
    torch's default dtype). Move ``stats`` to the wanted device first.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    mean = stats["mean"].to(torch.float64)
    noise = stratified_normal(batch, mean.shape[0], generator=generator,
                              device=mean.device, dtype=torch.float64)
    scale = stats["eigenvalues"].to(torch.float64).clamp_min(0.0).sqrt()
    z = (noise * scale) @ stats["eigenvectors"].to(torch.float64).T
    return (z * stats["std"].to(torch.float64) + mean).to(dtype)
