"""The field's disentanglement metrics (dsu_models/evaluation/disentanglement.py;
docs/method.md section 11): known answers on synthetic codes.

The factors are the full grid of 4 x 5 x 6 x 7 classes (840 combinations): the
train set holds it twice, the test set once, each shuffled. On a full grid the
factors are exactly independent and uniform, so a dim that copies one factor
carries exactly zero plug-in information about any other, and a classifier
reading a factor from an unrelated dim sees perfectly balanced classes. That is
what makes most of the expected values below exact rather than approximate.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dsu_models.evaluation import disentanglement as dis

CLASSES = (4, 5, 6, 7)
K = len(CLASSES)
GRID = np.array(list(itertools.product(*[range(n) for n in CLASSES])), np.int64)
_rng = np.random.default_rng(0)
TRAIN = _rng.permutation(np.concatenate([GRID, GRID]))
TEST = _rng.permutation(GRID)

# a classifier of factor j that sees an unrelated dim is right 1/n_j of the time
# on the balanced test grid (every class is equally likely whatever it predicts)
CHANCE = np.array([1.0 / n for n in CLASSES])


def perfect(f):
    return f.astype(np.float64)


def mixed(f):
    # dim 0 holds f0 and f1 together (a bijection of the pair: 4 x 5 = 20 values),
    # dims 1 and 2 copy f2 and f3
    return np.stack([f[:, 0] * CLASSES[1] + f[:, 1], f[:, 2], f[:, 3]], 1).astype(np.float64)


def duplicate(f):
    # dims 0 and 1 both copy f0; dims 2-4 copy f1-f3
    return np.stack([f[:, 0], f[:, 0], f[:, 1], f[:, 2], f[:, 3]], 1).astype(np.float64)


# the noisy codes are seeded by the set's size: train and test get different
# noise, and every call gives the same code

def noisy(f):
    return perfect(f) + 0.05 * np.random.default_rng(len(f)).normal(size=f.shape)


def gaussian(f):
    return np.random.default_rng(len(f) + 1).normal(size=(len(f), 6))


CODES = {"perfect": perfect, "mixed": mixed, "duplicate": duplicate, "noisy": noisy, "random": gaussian}


@pytest.fixture(scope="module")
def scores():
    """All six metrics of every code above, computed once."""
    return {name: dis.disentanglement_metrics(make(TRAIN), TRAIN, make(TEST), TEST, seed=0)
            for name, make in CODES.items()}


# ---------------------------------------------------------------- DCI

def test_dci_of_hand_made_importance_matrices():
    # one dim per factor: every entropy is 0
    assert dis.dci_from_importances(np.eye(4)) == pytest.approx((1.0, 1.0))
    # dim 0 split evenly over factors 0 and 1: its entropy is log_4(2) = 1/2, and
    # it holds half of all importance, so D = 1/2 * 1/2 + 1/4 + 1/4 = 3/4
    r = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    assert dis.dci_from_importances(r) == pytest.approx((0.75, 1.0))
    # factor 0 split evenly over 2 of 5 dims: C_0 = 1 - log_5(2), the others 1
    r = np.array([[.5, 0, 0, 0], [.5, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert dis.dci_from_importances(r) == pytest.approx((1.0, (1 - math.log(2, 5) + 3) / 4))
    # uniform importances: nothing is disentangled or complete
    assert dis.dci_from_importances(np.ones((5, 3))) == pytest.approx((0.0, 0.0), abs=1e-12)
    # K = 1 and D = 1: log base 1 is undefined; a single factor or a single dim is
    # trivially modular or complete by convention
    assert dis.dci_from_importances(np.ones((5, 1)))[0] == 1.0
    assert dis.dci_from_importances(np.ones((1, 3)))[1] == 1.0
    assert dis.dci_from_importances(np.zeros((3, 2))) == (0.0, 0.0)


def test_dci_perfect_code(scores):
    # each factor's trees split only on its own dim (every other dim is exactly
    # uninformative on the grid), so R is diagonal and the test set is read perfectly
    s = scores["perfect"]
    assert s["dci_disentanglement"] == pytest.approx(1.0, abs=1e-3)
    assert s["dci_completeness"] == pytest.approx(1.0, abs=1e-3)
    assert s["dci_informativeness"] == 1.0


def test_dci_noisy_perfect_code_stays_near_one(scores):
    s = scores["noisy"]  # noise of std 0.05 between classes 1 apart
    assert s["dci_disentanglement"] > 0.97 and s["dci_completeness"] > 0.97
    assert s["dci_informativeness"] == 1.0


def test_dci_random_code(scores):
    # a code independent of the factors: predictions are independent of the test
    # labels, so each factor's expected accuracy is 1/n_j (mean 0.190; the test
    # grid's 840 samples give a standard error of about 0.007 on the mean). The
    # trees can only fit noise, and every dim is as (un)useful as any other, so
    # importances are nearly uniform over dims for each factor and over factors
    # for each dim: both entropies are near their maximum, D and C near 0 (this
    # implementation gives about 0.001), far below the perfect code's 1.
    s = scores["random"]
    assert s["dci_informativeness"] == pytest.approx(CHANCE.mean(), abs=0.04)
    assert s["dci_disentanglement"] < 0.05
    assert s["dci_completeness"] < 0.05


def test_dci_mixed_code(scores):
    # R = [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]] (see the hand-made case):
    # D = 3/4 exactly, C = 1, and dim 0 still determines f0 and f1 exactly
    s = scores["mixed"]
    assert s["dci_disentanglement"] == pytest.approx(0.75, abs=0.01)
    assert s["dci_completeness"] == pytest.approx(1.0, abs=0.01)
    assert s["dci_informativeness"] == 1.0


def test_dci_duplicate_code(scores):
    # the two copies of f0 give bit-identical split gains; the trees visit dims in
    # a random order at each split and keep the first best, so over 30 trees f0's
    # importance falls about evenly on both copies: C_0 = 1 - log_5(2) = 0.569,
    # C = (C_0 + 3) / 4 = 0.892 (an uneven 0.4/0.6 split would give 0.894).
    # Every dim serves one factor: D = 1.
    s = scores["duplicate"]
    assert s["dci_disentanglement"] == pytest.approx(1.0, abs=1e-3)
    assert s["dci_completeness"] == pytest.approx((1 - math.log(2, 5) + 3) / 4, abs=0.005)
    assert s["dci_informativeness"] == 1.0


# ---------------------------------------------------------------- MIG

def test_mig_perfect_code(scores):
    # 20 equal-width bins over 0..n-1 put each class in its own bin, so I(z_j; v_j)
    # = H(v_j), and on the grid I(z_i; v_j) = 0 for i != j: every gap is H(v_j)
    assert scores["perfect"]["mig"] == pytest.approx(1.0, abs=1e-12)


def test_mig_noisy_perfect_code(scores):
    assert scores["noisy"]["mig"] > 0.95


def test_mig_random_code(scores):
    # binned Gaussian dims share no information with the factors; their plug-in
    # estimates carry a small positive bias (about (bins-1)(n_j-1)/(2N) nats)
    # that is alike for every dim, so the top-two gap is a small fraction of it
    assert 0.0 <= scores["random"]["mig"] < 0.02


def test_mig_mixed_code_is_not_penalised(scores):
    # MIG only asks whether one dim stands out for each factor, not whether a dim
    # serves one factor: dim 0's 20 values fall in 20 bins, a bijection of
    # (f0, f1), so I(z_0; f0) = H(f0) and I(z_0; f1) = H(f1), while the other
    # dims carry nothing about f0 or f1. Every normalised gap is exactly 1.
    assert scores["mixed"]["mig"] == pytest.approx(1.0, abs=1e-12)


def test_mig_duplicate_code(scores):
    # f0's two copies tie for the largest information: its gap is 0, the three
    # other gaps are 1, so MIG = 3/4
    assert scores["duplicate"]["mig"] == pytest.approx(0.75, abs=1e-12)


def test_mig_single_dim_and_constant_factors():
    # D = 1: the gap is the largest information itself
    assert dis.mig(perfect(TRAIN[:, :1]), TRAIN[:, :1])["mig"] == pytest.approx(1.0)
    # a constant factor has zero entropy and is skipped; all constant: undefined
    factors = np.concatenate([TRAIN[:, :1], np.zeros((len(TRAIN), 1), np.int64)], 1)
    assert dis.mig(perfect(TRAIN[:, :1]), factors)["mig"] == pytest.approx(1.0)
    assert math.isnan(dis.mig(perfect(TRAIN[:, :1]), factors[:, 1:])["mig"])


def test_histogram_bins_match_numpy_histogram():
    x = np.random.default_rng(3).normal(size=(500, 3))
    x[:, 2] = 1.5  # constant: one bin
    got = dis.histogram_bins(x, 7)
    for i in range(2):
        counts, _ = np.histogram(x[:, i], 7)
        assert np.array_equal(np.bincount(got[:, i], minlength=7), counts)
    assert (got[:, 2] == 0).all()


# ---------------------------------------------------------------- SAP

def test_sap_perfect_code(scores):
    # S_jj = 1 (a 1-D tree reads each class from its own interval); for i != j the
    # tree sees balanced classes in every leaf, predicts one class and is right
    # 1/n_j of the time on the balanced test grid. SAP = mean_j (1 - 1/n_j) = 0.810,
    # not 1: plain accuracies, as in disentanglement_lib.
    assert scores["perfect"]["sap"] == pytest.approx(np.mean(1 - CHANCE), abs=1e-9)


def test_sap_noisy_perfect_code(scores):
    # with noise the trees on unrelated dims fit it, so those accuracies scatter
    # around 1/n_j (standard error about 0.014 on 840 test samples) and the
    # second largest of three sits about one standard error above: a little
    # below the exact code's score
    assert scores["noisy"]["sap"] == pytest.approx(np.mean(1 - CHANCE), abs=0.04)


def test_sap_random_code(scores):
    # every S_ij is a chance-level accuracy (about 1/n_j, standard error about
    # 0.014 on 840 test samples), so the top two differ by sampling noise only
    assert 0.0 <= scores["random"]["sap"] < 0.04


def test_sap_mixed_code(scores):
    # 1-D trees read f0 = floor(z_0 / 5) and f1 = z_0 mod 5 (20 intervals of 84
    # train samples) exactly, so S matches the perfect code's for every factor:
    # like MIG, SAP does not ask whether one dim serves two factors
    assert scores["mixed"]["sap"] == pytest.approx(np.mean(1 - CHANCE), abs=1e-9)


def test_sap_duplicate_code(scores):
    # f0's two copies both score 1: its gap is 0
    expected = (0.0 + np.sum(1 - CHANCE[1:])) / K
    assert scores["duplicate"]["sap"] == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------- FactorVAE

def test_factorvae_perfect_codes(scores):
    # fixing factor k leaves its copy with zero (or, noisy, tiny) variance:
    # every vote names k's dim, every dim is assigned its factor
    assert scores["perfect"]["factorvae_score"] == 1.0
    assert scores["noisy"]["factorvae_score"] == 1.0
    # duplicate: fixing f0 zeroes both copies; either way the vote is right
    assert scores["duplicate"]["factorvae_score"] == 1.0


def test_factorvae_random_code(scores):
    # the voted dim is independent of the voted factor, which is uniform over K,
    # so any assignment gets an eval vote right with probability 1/K = 0.25;
    # standard error on 400 votes: sqrt(0.25 * 0.75 / 400) = 0.022
    assert scores["random"]["factorvae_score"] == pytest.approx(1 / K, abs=0.08)


def test_factorvae_mixed_code(scores):
    # fixing f0 leaves dim 0 with var(f1) / var(5 f0 + f1) = 2 / 33.25 of its
    # variance: f0's votes go to dim 0. Fixing f2 or f3 zeroes dims 1 or 2. Fixing
    # f1 leaves dim 0 31.25 / 33.25 of its variance, about what the other dims
    # keep, so f1's votes scatter over dims that are assigned f0, f2, f3: all of
    # f1's eval votes (a quarter, give or take 0.022) are wrong, the rest right.
    assert scores["mixed"]["factorvae_score"] == pytest.approx(0.75, abs=0.07)


def test_factorvae_inactive_dims():
    # every dim below the threshold: nothing can vote
    codes = 0.01 * perfect(TRAIN)
    assert dis.factorvae_score(codes, TRAIN)["factorvae_score"] == 0.0
    # a collapsed dim is never voted for, even though its variance is the smallest
    codes = np.concatenate([perfect(TRAIN), np.full((len(TRAIN), 1), 3.0)], 1)
    assert dis.factorvae_score(codes, TRAIN)["factorvae_score"] == 1.0


# ---------------------------------------------------------------- inputs, determinism

def test_torch_and_numpy_inputs_agree():
    code = noisy(TRAIN)
    a = dis.disentanglement_metrics(code, TRAIN, perfect(TEST), TEST, seed=3)
    b = dis.disentanglement_metrics(torch.from_numpy(code).float(), torch.from_numpy(TRAIN),
                                    torch.from_numpy(perfect(TEST)), torch.from_numpy(TEST), seed=3)
    assert a.keys() == b.keys() == {"dci_disentanglement", "dci_completeness", "dci_informativeness",
                                    "mig", "sap", "factorvae_score"}
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=0.02), key


def test_same_seed_same_scores(scores):
    again = dis.disentanglement_metrics(gaussian(TRAIN), TRAIN, gaussian(TEST), TEST, seed=0)
    assert again == scores["random"]
    code = gaussian(TRAIN)
    assert dis.factorvae_score(code, TRAIN, seed=5) == dis.factorvae_score(code, TRAIN, seed=5)


@pytest.mark.parametrize("args, name", [
    ((np.zeros(10), np.zeros((10, 1), np.int64)), "codes"),                   # codes not 2-D
    ((np.zeros((10, 0)), np.zeros((10, 1), np.int64)), "codes"),              # no dims
    ((np.full((10, 2), np.nan), np.zeros((10, 1), np.int64)), "codes"),       # not finite
    ((np.zeros((10, 2)).tolist(), np.zeros((10, 1), np.int64)), "codes"),     # a list
    ((np.zeros((10, 2)), np.zeros(10, np.int64)), "factors"),                 # factors not 2-D
    ((np.zeros((10, 2)), np.zeros((9, 1), np.int64)), "factors"),             # rows differ
    ((np.zeros((10, 2)), np.zeros((10, 1))), "factors"),                      # float labels
    ((np.zeros((10, 2)), -np.ones((10, 1), np.int64)), "factors"),            # negative
])
def test_bad_inputs_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        dis.mig(*args)
    with pytest.raises(ValueError, match=name):
        dis.factorvae_score(*args)
    with pytest.raises(ValueError, match="train_" + name):
        dis.sap(*args, *args)
    with pytest.raises(ValueError, match="test_" + name):
        dis.dci(np.zeros((10, 2)), np.zeros((10, 1), np.int64), *args)


def test_train_and_test_must_agree():
    z, f = np.zeros((10, 2)), np.zeros((10, 1), np.int64)
    with pytest.raises(ValueError, match="test_codes has 3 dims"):
        dis.dci(z, f, np.zeros((10, 3)), f)
    with pytest.raises(ValueError, match="test_factors has 2 factors"):
        dis.disentanglement_metrics(z, f, z, np.zeros((10, 2), np.int64))
    with pytest.raises(ValueError, match="bins"):
        dis.mig(z, f, bins=0)
