"""Evaluate a DisUnknown model with oracles and a leakage probe (docs/method.md section 11).

``model`` is anything with the :class:`dsu_models.inference.DisUnknownModel`
methods (duck typed): ``labeled_factors``, ``encode_unknown``, ``embed_labels``,
``generate``, ``encode_labels`` and ``label_encoder`` (None when the model has no S).
``train`` fits the leakage probe; the evaluated split (``test`` below: the
validation split when a choice is made, the test split for reported figures;
the callers name the results ``val_<metric>`` and ``test_<metric>``) is what is
judged. Both carry labels for every ground-truth factor, except that an
evaluation-only factor may be -1 (not labeled) on some rows; factors the model
does not label are *hidden*.

Metrics (all floats; ``<k>`` a labeled factor, ``<h>`` a hidden one):

- swap (``ecfg.pairs`` seeded test pairs (a, b), drawn with replacement): the
  image ``G(u of a, labels of b)``; ``swap_acc_<k>`` = share the oracle reads as
  b's class, ``preserve_<h>`` = share it reads as a's class (over the pairs whose
  a is labeled for h; a partly labeled factor also gets ``preserve_<h>_n`` and a
  95% Wilson interval ``preserve_<h>_low``/``_high``); ``swap_acc_mean``,
  ``preserve_mean``;
- ``content_consistency`` and ``code_consistency``: preservation without any
  label of the hidden factors (:mod:`~dsu_models.evaluation.consistency`);
- the field's metrics on the model's whole code (E's unknown code and S's labeled
  codes) against every factor: ``dci_disentanglement``, ``dci_completeness``,
  ``dci_informativeness``, ``mig``, ``sap``, ``factorvae_score``
  (:mod:`~dsu_models.evaluation.disentanglement`; on up to ``ecfg.field_samples``
  images, only when every image has every label);
- ``frechet``: Frechet distance in oracle feature space between the swapped
  images and as many distinct real test images (all of them if fewer), plus
  ``frechet_rel`` (divided by the real features' total variance) and ``realism``;
- leakage: ``leak_<k>`` / ``leak_chance_<k>``, the probe's balanced accuracy and
  chance level (see :mod:`~dsu_models.evaluation.metrics`), fitted on up to
  ``ecfg.probe_samples`` seeded train codes and scored on up to as many test
  codes; ``leak_excess_mean`` (mean of accuracy minus chance);
- reconstruction of the distinct real test images above: ``recon_mse``,
  ``recon_psnr`` (peak-to-peak 2), ``recon_explained``;
- ``lenc_acc_<k>``, ``lenc_acc_mean``: the labeled encoder S on the same images
  (only when the model has S);
- ``oracle_acc_<factor>``: the oracles' own test accuracy;
- the summary terms ``swap_score``, ``preserve_score``, ``disentangle_score``,
  and ``summary`` (see :func:`~dsu_models.evaluation.metrics.summary_score`).

Degenerate cases: K = 0 has no swap, leakage or lenc keys except
``leak_excess_mean`` = 0 (preservation covers every factor); m_u = 0 has no
leakage (each ``leak_<k>`` is its chance level, excess 0). Without hidden
factors there are no preservation keys.

Everything runs in batches of ``ecfg.batch_size`` images: the model on its own
device, the oracles on theirs; generated images are never all held at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dsu_models.config import EvaluateConfig
from dsu_models.data.base import InMemoryDataset, to_float
from dsu_models.evaluation import metrics as M
from dsu_models.evaluation.consistency import Worst, content_consistency
from dsu_models.evaluation.calls import generate as _generate, unknown_means as _unknown
from dsu_models.evaluation.oracles import OracleSet


def model_columns(model, data: InMemoryDataset) -> tuple[list[int], list[int]]:
    """Dataset columns of the model's labeled factors (model order) and of the hidden ones."""
    names = [f.name for f in data.factors]
    missing = [k for k in model.labeled_factors if k not in names]
    if missing:
        raise ValueError(f"evaluate: the model's labeled factors {missing} are not factors of dataset "
                         f"{data.name!r} (its factors: {names})")
    labeled = [names.index(k) for k in model.labeled_factors]
    return labeled, [j for j in range(len(names)) if j not in labeled]


def _subset(n: int, limit: int | None, seed: int) -> Tensor:
    """Seeded distinct indices: min(limit, n) of range(n) (all of them, in order, when limit is None)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


def _chunks(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _leakage(model, train, test, labeled: list[int], ecfg: EvaluateConfig) -> dict[str, float]:
    """Probe keys ``leak_<k>``, ``leak_chance_<k>``, ``leak_excess_mean``, ``disentangle_score``."""
    if not labeled:
        return {"leak_excess_mean": 0.0, "disentangle_score": 1.0}
    out = {}
    names = [train.factors[j].name for j in labeled]
    tr = _subset(len(train), ecfg.probe_samples, ecfg.seed)
    te = _subset(len(test), ecfg.probe_samples, ecfg.seed + 1)
    tr_labels, te_labels = train.labels[tr][:, labeled], test.labels[te][:, labeled]
    if model.unknown_size == 0:
        results = [(1.0 / len(te_labels[:, k].unique()),) * 2 for k in range(len(labeled))]
    else:
        results = M.probe_leakage(_unknown(model, train.images[tr], ecfg.batch_size), tr_labels,
                                  _unknown(model, test.images[te], ecfg.batch_size), te_labels)
    for name, (acc, chance) in zip(names, results):
        out[f"leak_{name}"], out[f"leak_chance_{name}"] = acc, chance
    out["leak_excess_mean"] = sum(acc - chance for acc, chance in results) / len(results)
    leak = [M.normalised(acc, 1.0 / chance) for acc, chance in results]
    out["disentangle_score"] = 1.0 - sum(leak) / len(leak)
    return out


def _reconstruction(model, images: Tensor, labels: Tensor, batch_size: int) -> dict[str, float]:
    """recon_mse / recon_psnr / recon_explained of G(u of x, labels of x) on uint8 images (N, C, H, W).

    The real images' per-pixel variance is accumulated in float64 batch by batch
    (sums and sums of squares), so no float copy of all images is held.
    """
    sq_err, total = 0.0, 0
    px_sum = px_sq = 0.0
    for s in _chunks(len(images), batch_size):
        x = to_float(images[s])
        x_hat = _generate(model, _unknown(model, images[s], batch_size), labels[s])
        sq_err += float((x_hat - x).double().square().sum())
        total += x.numel()
        px_sum = px_sum + x.double().sum(0)
        px_sq = px_sq + x.double().square().sum(0)
    mse = sq_err / total
    n = len(images)
    variance = float((px_sq / n - (px_sum / n).square()).clamp_min(0).mean())
    return {"recon_mse": mse, "recon_psnr": M.psnr(mse),
            "recon_explained": min(1.0, max(0.0, 1.0 - mse / max(variance, 1e-12)))}


def whole_code(model, images: Tensor, batch_size: int) -> Tensor:
    """(N, m_u + sum m_k) the model's whole code of images: E's unknown-code means, then
    S's code means per labeled factor (the unknown part alone when the model has no S)."""
    parts = [_unknown(model, images, batch_size)]
    if model.labeled_factors and getattr(model, "label_encoder", None) is not None:
        parts.append(torch.cat([torch.cat(model.read_label_codes(images[s]), 1)
                                for s in _chunks(len(images), batch_size)]))
    return torch.cat(parts, 1)


def _field_metrics(model, train: InMemoryDataset, data: InMemoryDataset, ecfg: EvaluateConfig) -> dict:
    """DCI, MIG, SAP and the FactorVAE score (:mod:`.disentanglement`) of the whole code
    against every ground-truth factor, on up to ``ecfg.field_samples`` images of each split;
    none when that is 0, the code is empty or some image lacks a label."""
    if ecfg.field_samples == 0 or bool((train.labels < 0).any()) or bool((data.labels < 0).any()):
        return {}
    tr = _subset(len(train), ecfg.field_samples, ecfg.seed + 2)
    te = _subset(len(data), ecfg.field_samples, ecfg.seed + 3)
    z_train = whole_code(model, train.images[tr], ecfg.batch_size)
    if z_train.shape[1] == 0 or len(tr) < 2 or len(te) < 2:
        return {}
    from dsu_models.evaluation.disentanglement import disentanglement_metrics
    return disentanglement_metrics(z_train, train.labels[tr],
                                   whole_code(model, data.images[te], ecfg.batch_size), data.labels[te],
                                   seed=ecfg.seed)


def _label_encoder(model, images: Tensor, truth: Tensor, names: list[str], batch_size: int) -> dict:
    pred = torch.cat([model.encode_labels(images[s]).cpu() for s in _chunks(len(images), batch_size)])
    acc = (pred == truth).double().mean(0)
    out = {f"lenc_acc_{name}": float(a) for name, a in zip(names, acc)}
    out["lenc_acc_mean"] = float(acc.mean())
    return out


@dataclass
class SwapReadings:
    """What the oracles read from the swaps of seeded pairs (a, b): P pairs."""

    asked: Tensor      # (P, K) the labeled classes asked for (b's)
    read: Tensor       # (P, F) every factor's class as the oracles read it from the swap
    kept: Tensor       # (P, H) the hidden factors' classes of the content image a (-1: not labeled)
    features: Tensor   # (P, D) oracle features of the swaps


def _swaps(model, data, labeled, hidden, oracles: OracleSet, ecfg: EvaluateConfig) -> SwapReadings:
    """Swap ``ecfg.pairs`` seeded pairs of ``data`` and read them with the oracles."""
    gen = torch.Generator().manual_seed(ecfg.seed)
    a = torch.randint(len(data), (ecfg.pairs,), generator=gen)
    b = torch.randint(len(data), (ecfg.pairs,), generator=gen)
    reads, feats = [], []
    for s in _chunks(ecfg.pairs, ecfg.batch_size):
        u = _unknown(model, data.images[a[s]], ecfg.batch_size)
        pred, f = oracles.read(_generate(model, u, data.labels[b[s]][:, labeled]))
        reads.append(pred)
        feats.append(f)
    return SwapReadings(data.labels[b][:, labeled], torch.cat(reads), data.labels[a][:, hidden],
                        torch.cat(feats))


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``hits / n`` (``(0, 1)`` when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _preservation(readings: SwapReadings, hidden: list[int], data: InMemoryDataset) -> dict[str, float]:
    """``preserve_<h>`` per hidden factor on the pairs whose content image has a label for it;
    a factor labeled on only some rows (evaluation-only) also gets ``preserve_<h>_n`` and its
    95% interval ``preserve_<h>_low`` / ``_high``. Then ``preserve_mean`` and ``preserve_score``."""
    out, rates, normed = {}, [], []
    for i, j in enumerate(hidden):
        f = data.factors[j]
        truth = readings.kept[:, i]
        labeled = truth >= 0
        n = int(labeled.sum())
        if n == 0:
            out[f"preserve_{f.name}_n"] = 0.0
            continue
        hits = int((readings.read[labeled, j] == truth[labeled]).sum())
        out[f"preserve_{f.name}"] = hits / n
        if n < len(truth) or getattr(f, "eval_only", False):
            out[f"preserve_{f.name}_n"] = float(n)
            out[f"preserve_{f.name}_low"], out[f"preserve_{f.name}_high"] = wilson_interval(hits, n)
        rates.append(hits / n)
        normed.append(M.normalised(hits / n, f.classes))
    if rates:
        out["preserve_mean"] = sum(rates) / len(rates)
        out["preserve_score"] = sum(normed) / len(normed)
    return out


def confusion_matrices(readings: SwapReadings, labeled: list[int], data: InMemoryDataset) -> dict[str, Tensor]:
    """Per labeled factor the (n_k, n_k) counts of class asked for (rows) against class read (columns)."""
    out = {}
    for i, j in enumerate(labeled):
        n = data.factors[j].classes
        flat = readings.asked[:, i] * n + readings.read[:, j]
        out[data.factors[j].name] = torch.bincount(flat, minlength=n * n).reshape(n, n)
    return out


def _check_oracles(oracles: OracleSet, test: InMemoryDataset):
    names = [f.name for f in test.factors]
    if oracles.factor_names != names:
        raise ValueError(f"evaluate: oracles read factors {oracles.factor_names}, dataset {test.name!r} "
                         f"has {names}; train oracles on this dataset")


def _hit_rates(prefix: str, score_key: str, hits: Tensor, columns: list[int],
               data: InMemoryDataset) -> dict[str, float]:
    """``hits`` (N, len(columns)) bool -> ``<prefix>_<factor>`` rates, their mean
    ``<prefix>_mean`` and ``score_key``: the mean of the chance-normalised rates."""
    acc = hits.double().mean(0).tolist()
    factors = [data.factors[j] for j in columns]
    out = {f"{prefix}_{f.name}": v for f, v in zip(factors, acc)}
    out[f"{prefix}_mean"] = sum(acc) / len(acc)
    out[score_key] = sum(M.normalised(v, f.classes) for f, v in zip(factors, acc)) / len(acc)
    return out


@dataclass
class Evaluation:
    """:func:`evaluate_in_full`'s result: the metrics and what the pictures are drawn from."""

    metrics: dict[str, float]
    confusion: dict[str, Tensor]    # per labeled factor, class asked for x class read
    worst: Worst                    # the round trips that ended farthest from their content


def evaluate_in_full(model, train: InMemoryDataset, data: InMemoryDataset, ecfg: EvaluateConfig,
                     oracles: OracleSet, log: Callable[[str], None] | None = print) -> Evaluation:
    """The full metric set of the module docstring on ``data`` (the validation or the test
    split; ``train`` fits the leakage probe), with the swap confusion matrices and the
    round trips that ended farthest from their content."""
    _check_oracles(oracles, data)
    labeled, hidden = model_columns(model, data)
    names = [f.name for f in data.factors]
    out = {f"oracle_acc_{k}": float(v) for k, v in oracles.test_accuracy.items()}

    readings = _swaps(model, data, labeled, hidden, oracles, ecfg)
    if labeled:
        hits = readings.read[:, labeled] == readings.asked
        out.update(_hit_rates("swap_acc", "swap_score", hits, labeled, data))
    out.update(_preservation(readings, hidden, data))
    consistency, worst = content_consistency(model, data, labeled, ecfg.pairs, ecfg.batch_size, ecfg.seed)
    out.update(consistency)

    real = _subset(len(data), ecfg.pairs, ecfg.seed)
    real_feats = oracles.features(data.images[real])
    out["frechet"] = M.frechet_distance(real_feats, readings.features)
    spread = M.feature_spread(real_feats)
    out["frechet_rel"] = out["frechet"] / max(spread, 1e-12)
    out["realism"] = M.realism(out["frechet"], spread)

    out.update(_leakage(model, train, data, labeled, ecfg))
    out.update(_reconstruction(model, data.images[real], data.labels[real][:, labeled], ecfg.batch_size))
    if labeled and getattr(model, "label_encoder", None) is not None:
        out.update(_label_encoder(model, data.images[real], data.labels[real][:, labeled],
                                  [names[j] for j in labeled], ecfg.batch_size))
    out.update(_field_metrics(model, train, data, ecfg))
    out["summary"] = M.summary_score(out)
    if log is not None:
        log("evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return Evaluation(out, confusion_matrices(readings, labeled, data), worst)


def evaluate(model, train: InMemoryDataset, test: InMemoryDataset, ecfg: EvaluateConfig,
             oracles: OracleSet, log: Callable[[str], None] = print) -> dict[str, float]:
    """The metrics of :func:`evaluate_in_full` alone."""
    return evaluate_in_full(model, train, test, ecfg, oracles, log).metrics


def evaluate_stage1(model, train: InMemoryDataset, test: InMemoryDataset, ecfg: EvaluateConfig,
                    log: Callable[[str], None] = print) -> dict[str, float]:
    """Leakage and reconstruction keys plus ``stage1_objective`` (no oracles needed).

    ``model``: a stage-1 model (G1 and B1 as its generator and embedders).
    """
    labeled, _ = model_columns(model, test)
    out = _leakage(model, train, test, labeled, ecfg)
    real = _subset(len(test), ecfg.pairs, ecfg.seed)
    out.update(_reconstruction(model, test.images[real], test.labels[real][:, labeled], ecfg.batch_size))
    out["stage1_objective"] = M.stage1_objective(out)
    log("stage-1 evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out
