"""Metric arithmetic for evaluating a DisUnknown model (docs/method.md section 11).

Pure functions on tensors and metric dicts; :mod:`dsu_models.evaluation.evaluate`
runs the model and the oracles and calls these.

Choices where docs/method.md is silent (also the documentation of the score formulas):

- **Chance-normalised scores.** For an accuracy ``acc`` on a factor of ``n``
  classes, ``norm(acc, n) = clip((acc - 1/n) / (1 - 1/n), 0, 1)``: 0 at chance
  (a generator that ignores the requested labels hits b's class about 1/n of
  the time), 1 when perfect.
- **Leakage probe.** Multinomial logistic regression (scikit-learn, lbfgs, L2,
  C = 1) on standardised unknown-code means, one probe per labeled factor,
  scored by balanced accuracy (mean per-class recall) on test codes. Its chance
  level is ``1 / (classes present in the test labels)``, which is ``1/n`` once
  the test split holds every class.
- **PSNR** treats images in [-1, 1] as having a peak-to-peak range of 2:
  ``PSNR = 10 log10(2^2 / MSE)``, from the mean squared error over every pixel
  and channel of every evaluated image. It equals the usual PSNR of the same
  images scaled to [0, 1] with peak 1.
- **Explained reconstruction** ``recon_explained = clip(1 - MSE / V, 0, 1)``
  with ``V`` the per-pixel variance of the real images around their mean image:
  0 for a model that outputs the mean image, 1 for an exact copy.
- **Realism** ``exp(-FD / tr(Sigma_real))``: the Frechet distance FD in oracle
  feature space, relative to the total variance of the real images' features
  (so it does not depend on the feature scale), mapped into (0, 1].

The summary and the stage-1 objective are documented on :func:`summary_score`
and :func:`stage1_objective`.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

SCORE_FLOOR = 1e-3


SPLITS = ("val", "test")  # what chooses (the champion, Tune, milestones), what is reported


def split_key(split: str, name: str) -> str:
    """The name a metric takes on a split: ``val_<name>`` or ``test_<name>``."""
    if split not in SPLITS:
        raise ValueError(f"metrics are named for the split val or test, not {split!r}")
    return f"{split}_{name}"


def on_split(split: str, metrics: dict, prefix: str = "") -> dict:
    """One evaluation's metrics named for its split (``val_<prefix><metric>``)."""
    return {split_key(split, prefix + k): v for k, v in metrics.items()}


def from_split(split: str, logged: dict) -> dict:
    """The inverse of :func:`on_split` (no prefix): the split's metrics under their plain names."""
    head = split_key(split, "")
    return {k[len(head):]: v for k, v in logged.items() if k.startswith(head)}


def normalised(acc: float, classes: float) -> float:
    """Chance-normalised accuracy ``clip((acc - 1/n) / (1 - 1/n), 0, 1)`` (n = classes)."""
    chance = 1.0 / classes
    if chance >= 1.0:
        return 0.0
    return float(min(1.0, max(0.0, (acc - chance) / (1.0 - chance))))


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets, in float64.

    real: (N, D), fake: (M, D), N, M >= 2. ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f)
    - 2 tr((S_r^1/2 S_f S_r^1/2)^1/2)``; matrix square roots by symmetric
    eigendecomposition (eigenvalues clamped at 0), so it stays real and >= 0.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, "
                         f"got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    d = real.shape[1]
    cov_r, cov_f = torch.cov(real.T).reshape(d, d), torch.cov(fake.T).reshape(d, d)  # (D, D) even for D = 1
    val, vec = torch.linalg.eigh(cov_r)
    root_r = (vec * val.clamp_min(0).sqrt()) @ vec.T
    inner = root_r @ cov_f @ root_r
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross
    return float(fd.clamp_min(0))


def feature_spread(real: Tensor) -> float:
    """Total variance tr(Sigma) of (N, D) features, float64."""
    return float(real.double().var(0).sum())


def realism(frechet: float, spread: float) -> float:
    """``exp(-frechet / spread)``; 1 for features distributed like the real ones."""
    return math.exp(-frechet / max(spread, 1e-12))


def psnr(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): ``10 log10(4 / mse)``."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-10))


def balanced_accuracy(pred: Tensor, truth: Tensor) -> tuple[float, float]:
    """(mean per-class recall, its chance level 1 / classes present in ``truth``). pred, truth: (N,) int."""
    n = int(max(int(truth.max()), int(pred.max()))) + 1
    per_class = torch.bincount(truth, minlength=n).double()
    hits = torch.bincount(truth[pred == truth], minlength=n).double()
    present = per_class > 0
    return float((hits[present] / per_class[present]).mean()), 1.0 / int(present.sum())


def standardised(train_codes: Tensor, test_codes: Tensor):
    """Both code sets as float64 numpy arrays, scaled by the train codes' mean and
    std per dimension (a constant dimension becomes zeros), for the probes."""
    mean, std = train_codes.double().mean(0), train_codes.double().std(0).clamp_min(1e-8)
    return ((train_codes.double() - mean) / std).numpy(), ((test_codes.double() - mean) / std).numpy()


def probe_leakage(train_codes: Tensor, train_labels: Tensor, test_codes: Tensor, test_labels: Tensor,
                  ) -> list[tuple[float, float]]:
    """Per labeled factor: (balanced accuracy, chance) of a logistic-regression probe.

    train_codes: (N, m) unknown-code means, train_labels: (N, K) int; test_codes:
    (M, m), test_labels: (M, K). A factor with a single class in the train labels,
    or m = 0, gets the chance level (nothing can be learnt).
    """
    from sklearn.exceptions import ConvergenceWarning  # lazy: sklearn is slow to import
    from sklearn.linear_model import LogisticRegression

    out = []
    m = train_codes.shape[1]
    x_train, x_test = standardised(train_codes, test_codes)
    for k in range(train_labels.shape[1]):
        y_train, y_test = train_labels[:, k], test_labels[:, k]
        chance = 1.0 / len(y_test.unique())
        if m == 0 or len(y_train.unique()) < 2:
            out.append((chance, chance))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe = LogisticRegression(max_iter=500).fit(x_train, y_train.numpy())
        pred = torch.from_numpy(probe.predict(x_test)).to(torch.int64)
        out.append(balanced_accuracy(pred, y_test))
    return out


def _geometric_mean(terms: list[float]) -> float:
    if not terms:
        return 0.0
    logs = [math.log(min(1.0, max(SCORE_FLOOR, t))) for t in terms]
    return math.exp(sum(logs) / len(logs))


def summary_score(metrics: dict) -> float:
    """One number in [0.001, 1] for a finished model; higher is better.

    ``summary = geometric mean of the present terms, each clipped to [0.001, 1]``:

    - ``swap_score``: mean over labeled factors of ``norm(swap_acc_k, n_k)``;
    - ``preserve_score``: mean over hidden factors of ``norm(preserve_h, n_h)``; when no
      hidden factor has labels (a user's own images) ``content_consistency`` takes its place
      (:mod:`~dsu_models.evaluation.consistency`), so a generator that ignores the content
      image cannot score well for want of ground truth;
    - ``disentangle_score``: ``1 - mean over labeled factors of norm(leak_k, 1/leak_chance_k)``;
    - ``realism``: ``exp(-frechet / tr(Sigma_real))``,

    with ``norm(acc, n) = clip((acc - 1/n) / (1 - 1/n), 0, 1)``. A term is absent
    (not counted) when it does not apply: no labeled factors (K = 0) drops swap and
    leakage, no hidden factors drops preservation; with m_u = 0 there is no leakage
    (disentangle_score 1). The geometric mean is 0.001 (the floor) for a model that
    fails any one of these (a generator that ignores the requested labels has swap
    score 0), and 1 only for one that does all. A perfect model's score is bounded
    by the oracles' accuracies.
    """
    return _geometric_mean([float(metrics[k]) for k in summary_terms(metrics)])


def summary_terms(metrics: dict) -> list[str]:
    """The metric keys :func:`summary_score` multiplies: preservation by the oracles when
    hidden factors have labels, by ``content_consistency`` when they have none."""
    keep = "preserve_score" if "preserve_score" in metrics else "content_consistency"
    keys = ("swap_score", keep, "disentangle_score", "realism")
    return [k for k in keys if k in metrics]


def stage1_objective(metrics: dict) -> float:
    """Stage-1 objective for Ray Tune sweeps, in [0.001, 1]; higher is better.

    ``stage1_objective = sqrt(disentangle_score * recon_explained)`` (each clipped to
    [0.001, 1]): the geometric mean of low leakage (``1 - mean_k norm(leak_k)``, 1 when
    K = 0 or m_u = 0) and good reconstruction (``recon_explained = clip(1 - MSE / V,
    0, 1)``, V the real images' per-pixel variance). Stage 1 has no swap generator
    yet, and either half alone is easy: an unknown code that copies the image
    reconstructs it but leaks every label; an empty one leaks nothing but cannot
    reconstruct what the labels do not determine.
    """
    return _geometric_mean([float(metrics["disentangle_score"]), float(metrics["recon_explained"])])


def champion_failures(metrics: dict, ecfg) -> list[str]:
    """Why a model misses the champion bar of ``ecfg`` (an ``EvaluateConfig``; empty: it
    meets it), one short phrase per term.

    The bar: ``swap_acc_mean >= ecfg.champion_swap`` (when there are labeled factors),
    preservation ``>= ecfg.champion_preserve`` (``preserve_mean`` from the oracles where
    hidden factors have labels, else ``content_consistency``; neither applies without an
    unknown code) and ``leak_excess_mean <= ecfg.champion_leak``. A term that is missing
    or not finite fails.
    """
    checks = []
    if "swap_score" in metrics:
        checks.append(("swap_acc_mean", ">=", ecfg.champion_swap))
    keep = "preserve_mean" if "preserve_mean" in metrics else "content_consistency"
    if keep in metrics:
        checks.append((keep, ">=", ecfg.champion_preserve))
    checks.append(("leak_excess_mean", "<=", ecfg.champion_leak))
    out = []
    for key, op, bound in checks:
        value = float(metrics.get(key, math.nan))
        ok = math.isfinite(value) and (value >= bound if op == ">=" else value <= bound)
        if not ok:
            out.append(f"{key} {value:.3f}, needs {op} {bound:g}")
    return out
