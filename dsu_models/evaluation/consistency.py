"""Content preservation measured without labels of the unknown factors.

``evaluate`` measures preservation with oracles for the hidden factors; on a
user's own images those factors have no labels (that is why they are unknown).
The measures here need only the images and the labels of the *labeled*
factors, which the user has. Each one asks the same question: does the swapped
image show more of its content source than of another image?

For seeded triples ``(a, b, c)`` of the evaluated split (``c != a``): ``a`` is
the content source, ``b`` gives the labels, ``c`` is a *decoy*: another image
rendered by the same model with the same labels. With ``G`` the generator,
``E`` the unknown encoder and ``y`` the labeled factors' classes,

- ``x_ab = G(E(a), y_b)`` (the swap) and ``x_cb = G(E(c), y_b)`` (the decoy swap),
  each sent back to ``a``'s labels: ``x_aba = G(E(x_ab), y_a)``, ``x_cba = G(E(x_cb), y_a)``;
- ``content_consistency = 1 - sum d(x_aba, a) / sum d(x_cba, a)``, clipped to
  [0, 1], with ``d`` the mean squared pixel difference: the share of the
  content-dependent distance to ``a`` that the round trip keeps away. Both round
  trips end with ``a``'s labels and go through the same generator twice, so
  the generator's blur weighs on both sides alike; what differs is whether the
  content survived the swap. A perfect model brings ``a`` back (1).
- ``code_consistency``: the same in the unknown-code space after one swap,
  ``E(x_ab)`` against ``E(x_cb)``, each compared with ``E(a)`` after
  standardising every code dimension by its spread over the real images.

The one-way comparison (``x_ab`` against ``x_cb``, both with ``b``'s labels) is
not used: the label change itself is part of ``d(x_ab, a)``, so even a perfect
model stays far below 1 there, by an amount that depends on how much of the
picture the labels cover.

Swaps are quantised to uint8 before they are re-encoded, as a saved image would
be, so a signal too faint to survive in a picture does not count.

The judge is the pixel distance, not a network: nothing here was trained with
the generator or against it. What each measure says about a degenerate model:
a generator that ignores the unknown code (draws a prototype of the labels) or
an encoder that outputs a constant gives ``x_ab == x_cb``, so 0; an untrained
model is near 0; a model that copies its content image and ignores the labels
gets 1, because it does preserve the content: the swap accuracy, not this
measure, catches it. With no labeled factors (K = 0) the "swap" is a
reconstruction and the measures ask whether ``G(E(a))`` is closer to ``a``
than ``G(E(c))`` is. With no unknown code (m_u = 0) there is no content to keep:
no measure is reported (an empty dict).

docs/method.md section 11, "Preservation without labels: content consistency",
gives the reasoning; docs/benchmarks.md records how these track the oracles' ``preserve_mean`` on the built-in data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsu_models.data.base import InMemoryDataset, to_float, to_uint8
from dsu_models.evaluation.calls import generate as _generate, unknown_means as _unknown

@dataclass
class Worst:
    """The triples whose round trip ended farthest from its content image: uint8
    ``(n, C, H, W)`` content images ``a``, their swaps ``x_ab``, the round trips
    ``x_aba`` and the decoys' round trips ``x_cba`` (for comparison), and each round
    trip's distance ``d(x_aba, a)``, largest first. Ranked by that distance, not by the
    ratio: a decoy that happens to share ``a``'s content makes the ratio small for a
    round trip that worked."""

    content: Tensor
    swap: Tensor
    back: Tensor
    decoy_back: Tensor
    distance: Tensor


def triples(n: int, pairs: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded index triples ``(a, b, c)`` of ``range(n)``, each ``(pairs,)``, with ``c != a`` (n >= 2)."""
    if n < 2:
        raise ValueError(f"content consistency needs at least 2 images, got {n}")
    gen = torch.Generator().manual_seed(seed + 0xC0)
    a = torch.randint(n, (pairs,), generator=gen)
    b = torch.randint(n, (pairs,), generator=gen)
    c = (a + torch.randint(1, n, (pairs,), generator=gen)) % n
    return a, b, c


def _pixel_distance(x: Tensor, ref: Tensor) -> Tensor:
    """(B,) mean squared difference of two float image batches (B, C, H, W)."""
    return (x - ref).double().square().flatten(1).mean(1)


def _code_distance(u: Tensor, ref: Tensor, scale: Tensor) -> Tensor:
    return ((u - ref).double() / scale).square().sum(1)


def _ratio(near: float, far: float) -> float:
    """``clip(1 - near / far, 0, 1)``; 0 when nothing separates the decoy (far ~ 0)."""
    if far <= 1e-12:
        return 0.0
    return float(min(1.0, max(0.0, 1.0 - near / far)))


def content_consistency(model, data: InMemoryDataset, labeled: list[int], pairs: int, batch_size: int,
                        seed: int = 0, worst: int = 8) -> tuple[dict[str, float], Worst]:
    """The two measures of the module docstring over ``pairs`` seeded triples of ``data``.

    model: duck-typed ``DisUnknownModel`` (``encode_unknown``, ``embed_labels``,
    ``generate``, ``unknown_size``); data: uint8 images (N, C, S, S) with labels
    (N, F); labeled: the data columns of the model's labeled factors, in the
    model's order. Returns the metrics and the ``worst`` triples whose round trip ended
    farthest from ``a``.
    """
    if model.unknown_size == 0:
        blank = torch.zeros(0, *data.images.shape[1:], dtype=torch.uint8)
        return {}, Worst(blank, blank, blank, blank, torch.zeros(0))
    a_idx, b_idx, c_idx = triples(len(data), pairs, seed)
    scale = _unknown(model, data.images[torch.arange(min(len(data), 2048))], batch_size).double().std(0)
    scale = scale.clamp_min(1e-6)
    sums = torch.zeros(4, dtype=torch.float64)   # round trip, decoy round trip, code, decoy code
    keep = []
    for start in range(0, pairs, batch_size):
        s = slice(start, min(pairs, start + batch_size))
        a, c = data.images[a_idx[s]], data.images[c_idx[s]]
        y_a, y_b = data.labels[a_idx[s]][:, labeled], data.labels[b_idx[s]][:, labeled]
        u_a = _unknown(model, a, batch_size)
        x_ab = to_uint8(_generate(model, u_a, y_b))
        x_cb = to_uint8(_generate(model, _unknown(model, c, batch_size), y_b))
        u_ab, u_cb = _unknown(model, x_ab, batch_size), _unknown(model, x_cb, batch_size)
        x_aba, x_cba = _generate(model, u_ab, y_a), _generate(model, u_cb, y_a)
        real = to_float(a)
        d_back, d_decoy = _pixel_distance(x_aba, real), _pixel_distance(x_cba, real)
        sums += torch.stack([d_back.sum(), d_decoy.sum(), _code_distance(u_ab, u_a, scale).sum(),
                             _code_distance(u_cb, u_a, scale).sum()])
        # the running worst few, so that no more than a batch of images is held at once
        keep.append((-d_back, a, x_ab, to_uint8(x_aba), to_uint8(x_cba)))
        keep = [_lowest(keep, worst)]
    metrics = {"content_consistency": _ratio(sums[0], sums[1]), "code_consistency": _ratio(sums[2], sums[3])}
    negated, a, x_ab, x_aba, x_cba = keep[0]
    return metrics, Worst(a, x_ab, x_aba, x_cba, -negated.float())


def _lowest(parts: list[tuple[Tensor, ...]], n: int) -> tuple[Tensor, ...]:
    """Concatenate (key, images...) parts and keep the n of lowest key, lowest first."""
    joined = [torch.cat(column) for column in zip(*parts)]
    order = joined[0].argsort()[:n]
    return tuple(column[order] for column in joined)
