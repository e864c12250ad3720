"""The field's standard disentanglement metrics on a code matrix and discrete
ground-truth factors (docs/method.md section 11, "The field's disentanglement
metrics"): DCI, MIG, SAP and the FactorVAE score, as disentanglement_lib
(Locatello et al. 2019) defines them, adapted to a finite labeled data set.

Notation: codes ``z`` (N, D), factors ``v`` (N, K) of class indices; logs are
natural unless a base is given.

- **DCI** (Eastwood & Williams 2018). Per factor j a tree-ensemble classifier
  reads v_j from the whole code; its feature importances form column j of the
  importance matrix R (D x K, >= 0). Disentanglement: per code dim i,
  ``1 - H_K(R_i. / sum_j R_ij)`` (entropy with log base K), averaged with
  weights ``rho_i = sum_j R_ij / sum_ij R_ij``. Completeness: per factor j,
  ``1 - H_D(R_.j / sum_i R_ij)`` (log base D), averaged over factors with the
  same kind of weights (each factor's importances sum to 1, so this is the plain
  mean over the factors whose predictor used the code). Informativeness: the
  classifiers' mean test accuracy.
- **MIG** (Chen et al. 2018). Each code dim is cut into equal-width histogram
  bins; ``I(z_i; v_j)`` is the plug-in discrete mutual information. Per factor,
  ``(largest - second largest I over dims) / H(v_j)``, averaged over factors.
- **SAP** (Kumar et al. 2018), discrete version. S_ij = test accuracy of a
  classifier of v_j that sees only z_i; per factor the gap between the two
  largest S_ij over dims, averaged over factors.
- **FactorVAE score** (Kim & Mnih 2018). A vote fixes one value of a factor k,
  takes a batch of samples sharing it, divides their codes by the global
  per-dim std and names the active dim of least variance. Each dim is assigned
  the factor that most of the train votes gave it; the score is the share of
  eval votes that assignment gets right.

Edge cases where the definitions are silent are documented on each function.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# SAP's 1-D trees stop at leaves of this share of the train samples (at least 1),
# so a dim that says nothing about a factor cannot memorise it
SAP_MIN_LEAF_SHARE = 0.005


# ---------------------------------------------------------------- inputs

def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")


def _codes(x, name: str) -> np.ndarray:
    """(N, D) real codes, N >= 2, D >= 1, finite -> float64."""
    a = _as_numpy(x, name)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2 and D >= 1, got {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def _factors(x, name: str, n: int) -> np.ndarray:
    """(n, K) class indices >= 0, K >= 1 -> int64."""
    a = _as_numpy(x, name)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, K) with K >= 1, got {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows but the codes have {n}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    if (a < 0).any():
        raise ValueError(f"{name} holds negative class indices")
    return a.astype(np.int64)


def _one_set(codes, factors, prefix: str = ""):
    z = _codes(codes, prefix + "codes")
    return z, _factors(factors, prefix + "factors", len(z))


def _two_sets(train_codes, train_factors, test_codes, test_factors):
    z_tr, v_tr = _one_set(train_codes, train_factors, "train_")
    z_te, v_te = _one_set(test_codes, test_factors, "test_")
    if z_te.shape[1] != z_tr.shape[1]:
        raise ValueError(f"test_codes has {z_te.shape[1]} dims but train_codes has {z_tr.shape[1]}")
    if v_te.shape[1] != v_tr.shape[1]:
        raise ValueError(f"test_factors has {v_te.shape[1]} factors but train_factors has {v_tr.shape[1]}")
    return z_tr, v_tr, z_te, v_te


# ---------------------------------------------------------------- entropy helpers

def _normalised_entropy(weights: np.ndarray, base: int) -> np.ndarray:
    """Per row of nonnegative ``weights`` (R, C): entropy of the row divided by its
    sum, in log base ``base`` (0 log 0 = 0); 0 for an all-zero row."""
    total = weights.sum(1, keepdims=True)
    p = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(1) / math.log(base)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(N,) ints -> (N,) indices into their distinct values, and the number of values."""
    values, idx = np.unique(labels, return_inverse=True)
    return idx.reshape(-1), len(values)


# ---------------------------------------------------------------- DCI

def _dci_predictor(seed: int):
    # disentanglement_lib fits sklearn's default GradientBoostingClassifier (100
    # stages of depth-3 trees, one tree per class per stage): about 45 s for
    # 2,000 x 20 codes and 6 ten-class factors on 2 cores. 30 bagged trees give
    # the same kind of impurity importances in 3-4 s (a second job did not help
    # on 2 cores). Every split looks at every dim (max_features=None, as the
    # boosted trees do), so a dim that carries a factor wins each split it can
    # make and a useless dim is never split on for want of a better candidate;
    # leaves of >= 1% of the samples stop the trees from memorising noise, which
    # would hand the noise dims importance.
    from sklearn.ensemble import RandomForestClassifier  # lazy: sklearn is slow to import

    return RandomForestClassifier(n_estimators=30, max_features=None, min_samples_leaf=0.01,
                                  random_state=seed)


def _importances(z_tr, v_tr, z_te, v_te, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Importance matrix R (D, K) and per-factor test accuracies (K,)."""
    d, k = z_tr.shape[1], v_tr.shape[1]
    r, acc = np.zeros((d, k)), np.zeros(k)
    for j in range(k):
        classes = np.unique(v_tr[:, j])
        if len(classes) < 2:  # nothing to learn: predict the one class, use no dim
            acc[j] = np.mean(v_te[:, j] == classes[0])
            continue
        model = _dci_predictor(seed).fit(z_tr, v_tr[:, j])
        r[:, j] = np.abs(model.feature_importances_)
        acc[j] = np.mean(model.predict(z_te) == v_te[:, j])
    return r, acc


def dci_from_importances(r: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix r: (D, K) >= 0.

    K = 1: every dim is trivially modular (entropy with log base 1 is
    undefined), so disentanglement is 1. D = 1 likewise gives completeness 1.
    An all-zero r (no predictor used the code) scores 0 for both.
    """
    r = np.abs(np.asarray(r, dtype=np.float64))
    d, k = r.shape
    total = r.sum()
    if total == 0:
        return 0.0, 0.0
    per_dim = 1.0 - _normalised_entropy(r, k) if k > 1 else np.ones(d)
    per_factor = 1.0 - _normalised_entropy(r.T, d) if d > 1 else np.ones(k)
    disentanglement = float(np.sum(per_dim * r.sum(1) / total))
    completeness = float(np.sum(per_factor * r.sum(0) / total))
    return disentanglement, completeness


def dci(train_codes, train_factors, test_codes, test_factors, seed: int = 0) -> dict:
    """DCI disentanglement, completeness and informativeness.

    train_codes: (N, D) float, train_factors: (N, K) int class indices >= 0;
    test_codes: (M, D), test_factors: (M, K). The predictors are fitted on the
    train set; informativeness is their accuracy on the test set.

    Predictor: bagged trees, scikit-learn's RandomForestClassifier with 30
    trees that consider every dim at each split (max_features=None), leaves of
    at least 1% of the train samples, seeded; one per factor, its impurity-based
    ``feature_importances_`` as column j of R. disentanglement_lib uses
    gradient-boosted trees, some 12 times slower here; both give impurity
    importances normalised to sum to 1 per factor. A factor with one class in
    the train set gets an all-zero column and its constant prediction's
    accuracy. Returns ``dci_disentanglement``, ``dci_completeness``,
    ``dci_informativeness``.
    """
    z_tr, v_tr, z_te, v_te = _two_sets(train_codes, train_factors, test_codes, test_factors)
    r, acc = _importances(z_tr, v_tr, z_te, v_te, seed)
    disentanglement, completeness = dci_from_importances(r)
    return {"dci_disentanglement": disentanglement, "dci_completeness": completeness,
            "dci_informativeness": float(acc.mean())}


# ---------------------------------------------------------------- MIG

def histogram_bins(codes: np.ndarray, bins: int) -> np.ndarray:
    """(N, D) codes -> (N, D) int bin indices in [0, bins): ``bins`` equal-width
    bins spanning each dim's range, the maximum in the last bin (numpy's
    histogram edges); a constant dim falls in bin 0."""
    lo, hi = codes.min(0), codes.max(0)
    out = np.zeros(codes.shape, np.int64)
    for i in range(codes.shape[1]):
        if hi[i] > lo[i]:
            inner_edges = np.linspace(lo[i], hi[i], bins + 1)[1:-1]
            out[:, i] = np.searchsorted(inner_edges, codes[:, i], side="right")
    return out


def mutual_information(binned: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Plug-in mutual information in nats between each column of ``binned`` (N, D)
    ints >= 0 and ``labels`` (N,) ints: (D,)."""
    n, d = binned.shape
    y, c = _compact(labels)
    b = int(binned.max()) + 1
    flat = (np.arange(d)[None, :] * b + binned) * c + y[:, None]
    joint = np.bincount(flat.ravel(), minlength=d * b * c).reshape(d, b, c) / n
    p_code, p_label = joint.sum(2, keepdims=True), joint.sum(1, keepdims=True)
    seen = joint > 0  # 0 log 0 = 0; where joint > 0 both marginals are > 0 too
    ratio = np.where(seen, joint, 1.0) / np.where(seen, p_code * p_label, 1.0)
    return np.maximum(np.where(seen, joint * np.log(ratio), 0.0).sum((1, 2)), 0.0)


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(_compact(labels)[0]) / len(labels)
    return float(-np.sum(p * np.log(p)))


def mig(codes, factors, bins: int = 20) -> dict:
    """Mutual information gap.

    codes: (N, D) float, factors: (N, K) int class indices >= 0. Each dim is cut
    into ``bins`` equal-width bins (:func:`histogram_bins`). Per factor j with
    entropy H(v_j) > 0: ``(I_(1) - I_(2)) / H(v_j)`` with I_(1) >= I_(2) the two
    largest ``I(z_i; v_j)`` over dims; with D = 1 the gap is I_(1) itself.
    Factors with zero entropy (one class) are skipped; the score is NaN if every
    factor is. Returns ``mig``.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    z, v = _one_set(codes, factors)
    binned = histogram_bins(z, bins)
    gaps = []
    for j in range(v.shape[1]):
        h = _entropy(v[:, j])
        if h <= 0:
            continue
        mi = np.sort(mutual_information(binned, v[:, j]))[::-1]
        gap = mi[0] - mi[1] if len(mi) > 1 else mi[0]
        gaps.append(gap / h)
    return {"mig": float(np.mean(gaps)) if gaps else math.nan}


# ---------------------------------------------------------------- SAP

def sap_score_matrix(z_tr, v_tr, z_te, v_te) -> np.ndarray:
    """S (D, K): test accuracy of a 1-D decision tree reading factor j from dim i alone."""
    from sklearn.tree import DecisionTreeClassifier  # lazy: sklearn is slow to import

    d, k = z_tr.shape[1], v_tr.shape[1]
    min_leaf = max(1, int(SAP_MIN_LEAF_SHARE * len(z_tr)))
    s = np.zeros((d, k))
    for j in range(k):
        for i in range(d):
            tree = DecisionTreeClassifier(min_samples_leaf=min_leaf, random_state=0)
            tree.fit(z_tr[:, i:i + 1], v_tr[:, j])
            s[i, j] = np.mean(tree.predict(z_te[:, i:i + 1]) == v_te[:, j])
    return s


def sap(train_codes, train_factors, test_codes, test_factors) -> dict:
    """Separated attribute predictability, discrete-factor version.

    train_codes: (N, D) float, train_factors: (N, K) int class indices >= 0;
    test_codes: (M, D), test_factors: (M, K). S_ij is the test accuracy of a
    classifier of factor j fitted on the train values of dim i alone; the score
    is the mean over factors of the gap between the two largest S_ij over dims
    (the largest itself when D = 1).

    Predictor: a 1-D decision tree (scikit-learn's DecisionTreeClassifier, leaves
    of at least 0.5% of the train samples). It reads a class from any set of
    intervals of the dim, where disentanglement_lib's 1-D LinearSVC separates
    little more than the two end classes of an ordered factor. As in
    disentanglement_lib, S holds plain accuracies, so a perfect code scores
    ``mean_j (1 - a_j)`` with a_j the accuracy of predicting factor j from an
    unrelated dim (about its majority-class share), not 1. Returns ``sap``.
    """
    z_tr, v_tr, z_te, v_te = _two_sets(train_codes, train_factors, test_codes, test_factors)
    s = np.sort(sap_score_matrix(z_tr, v_tr, z_te, v_te), axis=0)[::-1]
    gaps = s[0] - s[1] if len(s) > 1 else s[0]
    return {"sap": float(gaps.mean())}


# ---------------------------------------------------------------- FactorVAE

def _votes(z_scaled, groups, rng, count: int, batch_size: int, active: np.ndarray) -> np.ndarray:
    """(K, D) vote counts: ``count`` votes, each from a batch sharing one factor value."""
    k_total, d = len(groups), z_scaled.shape[1]
    votable = [k for k in range(k_total) if groups[k]]
    votes = np.zeros((k_total, d), np.int64)
    for _ in range(count):
        k = votable[rng.integers(len(votable))]
        members = groups[k][rng.integers(len(groups[k]))]
        batch = rng.choice(members, size=batch_size, replace=len(members) < batch_size)
        local = z_scaled[batch][:, active].var(0, ddof=1)
        votes[k, active[np.argmin(local)]] += 1
    return votes


def factorvae_score(codes, factors, seed: int = 0, batch_size: int = 64, train_votes: int = 800,
                    eval_votes: int = 400, prune_threshold: float = 0.05) -> dict:
    """FactorVAE disentanglement score on a finite labeled set.

    codes: (N, D) float, factors: (N, K) int class indices >= 0. Codes are
    divided by their global per-dim std (ddof 1, over all N samples). A dim is
    active if its global std is at least ``prune_threshold`` (disentanglement_lib
    compares the std, not the variance, with its 0.05 threshold). A vote picks a
    factor k uniformly, then one of its values uniformly among those held by at
    least two samples, draws ``batch_size`` samples with that value (with
    replacement only if fewer exist), and votes (argmin over active dims of the
    batch's scaled variance, k). Factors with no such value, or with a single
    value (fixing them fixes nothing), take no votes. Each dim is assigned the
    factor with most of its ``train_votes`` (ties and unvoted dims: the lowest
    factor index); the score is the share of ``eval_votes`` whose dim's
    assignment is their factor. 0 if no dim is active or no factor can vote.
    Seeded by a numpy Generator. Returns ``factorvae_score``.
    """
    if batch_size < 2 or train_votes < 1 or eval_votes < 1:
        raise ValueError(f"batch_size must be >= 2 and train_votes, eval_votes >= 1; got "
                         f"{batch_size}, {train_votes}, {eval_votes}")
    z, v = _one_set(codes, factors)
    std = z.std(0, ddof=1)
    active = np.flatnonzero(std >= prune_threshold)
    groups = []
    for k in range(v.shape[1]):
        values, idx, counts = np.unique(v[:, k], return_inverse=True, return_counts=True)
        order = np.argsort(idx.reshape(-1), kind="stable")
        members = np.split(order, np.cumsum(counts)[:-1])
        groups.append([m for m in members if len(m) >= 2] if len(values) >= 2 else [])
    if len(active) == 0 or not any(groups):
        return {"factorvae_score": 0.0}
    z_scaled = z / np.where(std > 0, std, 1.0)
    rng = np.random.default_rng(seed)
    train = _votes(z_scaled, groups, rng, train_votes, batch_size, active)
    evaluation = _votes(z_scaled, groups, rng, eval_votes, batch_size, active)
    assigned = np.argmax(train, axis=0)
    correct = evaluation[assigned, np.arange(z.shape[1])].sum()
    return {"factorvae_score": float(correct / evaluation.sum())}


# ---------------------------------------------------------------- all of them

def disentanglement_metrics(train_codes, train_factors, test_codes, test_factors, seed: int = 0) -> dict:
    """DCI (3 keys), MIG, SAP and the FactorVAE score in one dict.

    train_codes: (N, D) float, train_factors: (N, K) int class indices >= 0;
    test_codes: (M, D), test_factors: (M, K). DCI and SAP fit their predictors
    on the train set and score on the test set. MIG and the FactorVAE score fit
    nothing, so they use both sets concatenated (N + M samples): more samples
    give less biased mutual information and fuller vote batches.
    """
    z_tr, v_tr, z_te, v_te = _two_sets(train_codes, train_factors, test_codes, test_factors)
    z_all, v_all = np.concatenate([z_tr, z_te]), np.concatenate([v_tr, v_te])
    out = dci(z_tr, v_tr, z_te, v_te, seed=seed)
    out.update(mig(z_all, v_all))
    out.update(sap(z_tr, v_tr, z_te, v_te))
    out.update(factorvae_score(z_all, v_all, seed=seed))
    return out
