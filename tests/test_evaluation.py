"""Evaluation (dsu_models.evaluation; docs/method.md section 11): known-answer tests.

The built-in shapes3d is procedural, so fake "models" can be exact: a perfect
generator renders the requested factors; its unknown code is the hidden factors'
class indices, found by looking the image up among the rendered data. The data
here is shapes3d at 16 px with scale and orientation fixed (so a small oracle
reads every remaining factor after a few seconds of training); floor_hue and
object_hue are labeled, wall_hue and shape hidden.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsu_models.config import EvaluateConfig
from dsu_models.data.base import InMemoryDataset, to_float
from dsu_models.data.sources import shapes3d
from dsu_models.evaluation import (OracleWarning, evaluate, evaluate_stage1, frechet_distance,
                                   load_or_train_oracles, oracle_key, stage1_objective, summary_score)
from dsu_models.evaluation import metrics as M
from dsu_models.evaluation import oracles as O

SIZE = 16
VARY = ["floor_hue", "wall_hue", "object_hue", "shape"]    # columns of the test dataset
FIXED = {"scale": 7, "orientation": 7}                      # largest object, upright
LABELED = ["floor_hue", "object_hue"]
ECFG = EvaluateConfig(pairs=400, batch_size=128, oracle_epochs=5, oracle_samples=None,
                      oracle_width=16, probe_samples=1000, seed=0)


def full_labels(labels: torch.Tensor) -> np.ndarray:
    """(N, len(VARY)) dataset labels -> (N, 6) shapes3d class indices."""
    names = [n for n, _ in shapes3d.FACTORS]
    out = np.zeros((len(labels), len(names)), np.int64)
    for name, value in FIXED.items():
        out[:, names.index(name)] = value
    for j, name in enumerate(VARY):
        out[:, names.index(name)] = labels[:, j].numpy()
    return out


def render(labels: torch.Tensor) -> torch.Tensor:
    """(N, len(VARY)) labels -> uint8 (N, 3, S, S)."""
    return torch.from_numpy(shapes3d.render(full_labels(labels), SIZE)).permute(0, 3, 1, 2).contiguous()


def make_split(n: int, seed: int, name: str = "shapes3d-subset") -> InMemoryDataset:
    g = torch.Generator().manual_seed(seed)
    infos = {f.name: f for f in shapes3d.factor_table()}
    factors = [infos[n_] for n_ in VARY]
    labels = torch.stack([torch.randint(f.classes, (n,), generator=g) for f in factors], 1)
    return InMemoryDataset(render(labels), labels, factors, name=name)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return make_split(1000, seed=1), make_split(400, seed=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("oracle-cache")


@pytest.fixture(scope="module")
def oracles(data, cache):
    torch.manual_seed(0)
    return load_or_train_oracles(*data, ECFG, cache, log=lambda s: None)


class FakeModel:
    """Duck-typed DisUnknownModel over the procedural data.

    code: "hidden" (hidden factors' class indices), "labels" (hidden indices plus
    one-hot labeled factors: leaks), "random" (noise), "key" (a random number per
    image that the generator looks up: carries no label information).
    keep_a: the generator ignores the requested labels and returns image a.
    """

    def __init__(self, data, labeled, code="hidden", keep_a=False):
        train, test = data
        self.images = torch.cat([train.images, test.images])
        self.table = torch.cat([train.labels, test.labels])
        self.keys = torch.rand(len(self.table), generator=torch.Generator().manual_seed(5))
        self.names = [f.name for f in train.factors]
        self.labeled_factors = list(labeled)
        self.lab = [self.names.index(k) for k in labeled]
        self.hid = [j for j in range(len(self.names)) if j not in self.lab]
        self.classes = [f.classes for f in train.factors]
        self.code, self.keep_a = code, keep_a
        self.label_encoder = object()          # has a (perfect) S
        self.device = torch.device("cpu")
        sizes = {"hidden": len(self.hid), "random": 3, "key": 1,
                 "labels": len(self.hid) + sum(self.classes[j] for j in self.lab)}
        self.unknown_size = sizes[code]

    def _lookup(self, images):
        dist = torch.cdist(to_float(images).flatten(1), to_float(self.images).flatten(1))
        return dist.argmin(1)

    def encode_unknown(self, images):
        row = self._lookup(images)
        labels = self.table[row]
        if self.code == "random":
            return torch.randn(len(images), 3)
        if self.code == "key":
            return self.keys[row, None]
        hidden = labels[:, self.hid].float()
        if self.code == "labels":
            onehots = [torch.nn.functional.one_hot(labels[:, j], self.classes[j]).float() for j in self.lab]
            return torch.cat([hidden, *onehots], 1)
        return hidden

    def embed_labels(self, labels):
        assert labels.dtype == torch.int64 and labels.shape[1] == len(self.lab)
        return [labels[:, k:k + 1].float() for k in range(labels.shape[1])]

    def generate(self, unknown, label_codes):
        n = len(unknown)
        if self.keep_a:
            row = (unknown[:, :1] - self.keys[None, :]).abs().argmin(1)
            return to_float(self.images[row])
        labels = torch.zeros(n, len(self.names), dtype=torch.int64)
        if self.hid and self.code != "random":
            labels[:, self.hid] = unknown[:, :len(self.hid)].round().long()
        for k, j in enumerate(self.lab):
            labels[:, j] = label_codes[k][:, 0].round().long()
        return to_float(render(labels))

    def encode_labels(self, images):
        return self.table[self._lookup(images)][:, self.lab]

    def read_label_codes(self, images):
        return self.embed_labels(self.encode_labels(images))


# ----------------------------------------------------------------- metric arithmetic


def test_frechet_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g)
    assert frechet_distance(a, b) < 0.01
    # mean shift d: |d|^2; 1-D N(0,1) vs N(0,4): (1 - 2)^2 = 1 per dimension
    assert frechet_distance(a, b + torch.tensor([2.0, 0, 0])) == pytest.approx(4.0, abs=0.05)
    assert frechet_distance(a, 2 * b) == pytest.approx(3.0, abs=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_psnr_normalised_balanced_accuracy():
    assert M.psnr(0.04) == pytest.approx(20.0)            # 10 log10(4 / 0.04)
    assert M.normalised(0.1, 10) == 0.0 and M.normalised(1.0, 10) == 1.0
    assert M.normalised(0.55, 10) == pytest.approx(0.5)
    truth = torch.tensor([0, 0, 0, 0, 1, 1])
    acc, chance = M.balanced_accuracy(torch.zeros(6, dtype=torch.int64), truth)
    assert (acc, chance) == (0.5, 0.5)                     # a constant guess is at chance


def test_summary_and_stage1_formulas():
    perfect = {"swap_score": 1.0, "preserve_score": 1.0, "disentangle_score": 1.0, "realism": 1.0}
    assert summary_score(perfect) == pytest.approx(1.0)
    half = dict(perfect, swap_score=0.25)
    assert summary_score(half) == pytest.approx(0.25 ** 0.25)
    assert summary_score(dict(perfect, swap_score=0.0)) == pytest.approx(M.SCORE_FLOOR ** 0.25)
    assert summary_score({"preserve_score": 0.64, "realism": 1.0}) == pytest.approx(0.8)   # K = 0
    assert stage1_objective({"disentangle_score": 0.81, "recon_explained": 1.0}) == pytest.approx(0.9)


def test_probe_leakage_random_and_copied_codes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(5, (1200, 2), generator=g)
    noise = torch.randn(1200, 4, generator=g)
    copied = torch.nn.functional.one_hot(labels[:, 0], 5).float() + 0.01 * noise[:, :1]
    res_noise = M.probe_leakage(noise[:800], labels[:800], noise[800:], labels[800:])
    res_copy = M.probe_leakage(copied[:800], labels[:800], copied[800:], labels[800:])
    for acc, chance in res_noise:
        assert chance == pytest.approx(0.2) and abs(acc - chance) < 0.08
    assert res_copy[0][0] > 0.99 and abs(res_copy[1][0] - 0.2) < 0.08


# ----------------------------------------------------------------- oracles and caching


def test_oracles_read_every_factor(oracles, data):
    assert oracles.factor_names == VARY
    assert set(oracles.test_accuracy) == set(VARY)
    for name, acc in oracles.test_accuracy.items():
        assert acc >= 0.9, (name, oracles.test_accuracy)
    _, test = data
    pred, feats = oracles.read(test.images[:50])
    assert pred.dtype == torch.int64 and pred.shape == (50, 4) and feats.shape == (50, O.FEATURES)
    assert torch.equal(pred, oracles.predict(to_float(test.images[:50])))   # uint8 and float agree
    with pytest.raises(ValueError, match="shape"):
        oracles.predict(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_oracle_cache_reused_and_keyed_by_content(oracles, data, cache, monkeypatch, tmp_path):
    files = list(cache.glob("oracle-*.pt"))
    assert len(files) == 1
    record = torch.load(files[0], weights_only=True)
    assert record["test_accuracy"] == oracles.test_accuracy

    def no_training(*args, **kwargs):
        raise AssertionError("oracles were trained again instead of loaded from the cache")

    monkeypatch.setattr(O, "_fit", no_training)
    lines = []
    again = load_or_train_oracles(*data, ECFG, cache, log=lines.append)
    assert "loaded from" in lines[0] and again.test_accuracy == oracles.test_accuracy
    _, test = data
    assert torch.equal(again.predict(test.images), oracles.predict(test.images))

    train, test = data
    labels = train.labels.clone()
    labels[0, 0] = (labels[0, 0] + 1) % 10
    changed = InMemoryDataset(train.images, labels, train.factors, name=train.name)
    assert oracle_key(changed, test, ECFG) != oracle_key(train, test, ECFG)
    pixels = train.images.clone()
    pixels[0, 0, 0, 0] ^= 1
    assert oracle_key(InMemoryDataset(pixels, train.labels, train.factors), test, ECFG) != \
        oracle_key(train, test, ECFG)
    other = EvaluateConfig(**{**ECFG.__dict__, "oracle_epochs": ECFG.oracle_epochs + 1})
    assert O.oracle_path(cache, oracle_key(train, test, other)) != files[0]

    broken = tmp_path / "oracle-broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="oracle-broken.pt.*delete it"):
        O.load_oracles(broken)


def test_oracles_learn_a_partly_labeled_factor_from_its_labeled_rows(data, tmp_path):
    """-1 marks an image not labeled for a factor (evaluation-only columns): the oracle
    learns that factor from the other rows and its accuracy counts labeled rows only."""
    train, test = data
    j = VARY.index("shape")
    labels = train.labels.clone()
    labels[torch.arange(len(labels)) % 5 != 0, j] = -1
    partial = InMemoryDataset(train.images, labels, train.factors, train.ids, train.name)
    test_labels = test.labels.clone()
    test_labels[::2, j] = -1
    partial_test = InMemoryDataset(test.images, test_labels, test.factors, test.ids, test.name)
    oracles = O.train_oracles(partial, partial_test, ECFG, log=lambda s: None)
    assert oracles.test_accuracy["shape"] > 0.8          # 200 labeled images of 4 shapes
    accuracy = O.oracle_accuracy(oracles, partial_test)
    labeled = test_labels[:, j] >= 0
    expected = float((oracles.predict(test.images[labeled])[:, j] == test.labels[labeled, j]).double().mean())
    assert accuracy["shape"] == pytest.approx(expected)


def test_weak_oracle_on_builtin_dataset_warns(oracles):
    weak = O.OracleSet(oracles.net, oracles.factors, {"floor_hue": 0.5, "shape": 0.99},
                       oracles.image_shape)
    lines = []
    with pytest.warns(OracleWarning, match="'floor_hue'.*0.500"):
        O.warn_if_weak(weak, "shapes3d", lines.append)
    assert len(lines) == 1 and "'floor_hue'" in lines[0] and "'shape'" not in lines[0]
    O.warn_if_weak(weak, "my_photos", lines.append)      # not built in: no rule
    assert len(lines) == 1


# ----------------------------------------------------------------- fake models


@pytest.fixture(scope="module")
def results(data, oracles):
    models = {"perfect": FakeModel(data, LABELED), "unchanged": FakeModel(data, LABELED, "key", keep_a=True),
              "leaky": FakeModel(data, LABELED, "labels"), "random": FakeModel(data, LABELED, "random")}
    return {name: evaluate(m, *data, ECFG, oracles, log=lambda s: None) for name, m in models.items()}


def test_perfect_generator_swaps_and_preserves(results, oracles):
    r = results["perfect"]
    for k in LABELED:
        assert r[f"swap_acc_{k}"] >= oracles.test_accuracy[k] - 0.05 and r[f"swap_acc_{k}"] > 0.9
    for h in ("wall_hue", "shape"):
        assert r[f"preserve_{h}"] >= oracles.test_accuracy[h] - 0.05 and r[f"preserve_{h}"] > 0.9
    assert r["recon_mse"] == 0.0 and r["recon_psnr"] > 90 and r["recon_explained"] == 1.0
    assert r["lenc_acc_floor_hue"] == 1.0 and r["lenc_acc_mean"] == 1.0
    assert r["realism"] > 0.8 and r["frechet_rel"] < 0.2
    for k in LABELED:                                       # hidden indices say nothing about labels
        assert abs(r[f"leak_{k}"] - r[f"leak_chance_{k}"]) < 0.1
    assert r["summary"] > 0.8


def test_unchanged_generator_preserves_but_does_not_swap(results, oracles):
    r = results["unchanged"]
    for k in LABELED:
        assert r[f"swap_acc_{k}"] < 0.1 + 0.1              # chance 1/10: b's class only when a's agrees
    assert r["swap_score"] < 0.1
    for h in ("wall_hue", "shape"):
        assert r[f"preserve_{h}"] >= oracles.test_accuracy[h] - 0.05
    assert r["realism"] > 0.8                               # real images, just the wrong ones
    assert abs(r["leak_excess_mean"]) < 0.1


def test_leakage_random_code_at_chance_label_code_high(results):
    for k in LABELED:
        rnd, leaky = results["random"], results["leaky"]
        assert rnd[f"leak_chance_{k}"] == pytest.approx(0.1, abs=0.01)
        assert abs(rnd[f"leak_{k}"] - rnd[f"leak_chance_{k}"]) < 0.1
        assert leaky[f"leak_{k}"] > 0.95
    assert results["leaky"]["leak_excess_mean"] > 0.8 and results["leaky"]["disentangle_score"] < 0.1
    assert results["leaky"]["swap_score"] > 0.9           # it still swaps: only leakage is wrong


def test_summary_orders_models(results):
    s = {name: r["summary"] for name, r in results.items()}
    assert s["perfect"] > s["leaky"] + 0.3 and s["perfect"] > s["unchanged"] + 0.3
    assert s["perfect"] > s["random"] + 0.3
    for r in results.values():
        assert 0.0 < r["summary"] <= 1.0 and r["summary"] == pytest.approx(summary_score(r))


class PrototypeModel(FakeModel):
    """Ignores its content image: the unknown code is always the prior mean (an encoder
    that outputs a constant), so G draws a prototype of the requested labels."""

    def encode_unknown(self, images):
        return torch.zeros(len(images), self.unknown_size)


def test_content_consistency_without_labels_of_hidden_factors(results, data):
    """The label-free measures rank the fake models as their ground truth does: the
    perfect and the unchanged generator keep the content, the random code and the
    prototype generator do not."""
    from dsu_models.evaluation.consistency import content_consistency
    test = data[1]
    lab = [VARY.index(k) for k in LABELED]
    got = {name: content_consistency(m, test, lab, 400, 128)[0] for name, m in
           {"perfect": FakeModel(data, LABELED), "unchanged": FakeModel(data, LABELED, "key", keep_a=True),
            "random": FakeModel(data, LABELED, "random"), "prototype": PrototypeModel(data, LABELED)}.items()}
    assert got["perfect"]["content_consistency"] > 0.9 and got["perfect"]["code_consistency"] > 0.8
    assert got["unchanged"]["content_consistency"] == 1.0    # it keeps the content (swap catches it)
    for bad in ("random", "prototype"):
        assert got[bad]["content_consistency"] < 0.05 and got[bad]["code_consistency"] < 0.05
    for name in ("perfect", "unchanged", "random"):          # evaluate reports the same numbers
        r = results[name]
        assert r["content_consistency"] == pytest.approx(got[name]["content_consistency"])


def test_summary_uses_content_consistency_without_hidden_labels():
    base = {"swap_score": 1.0, "disentangle_score": 1.0, "realism": 1.0}
    assert M.summary_terms(dict(base, preserve_score=0.5, content_consistency=0.1)) == \
        ["swap_score", "preserve_score", "disentangle_score", "realism"]
    # no hidden-factor labels: a generator that ignores the content scores low
    assert summary_score(dict(base, content_consistency=0.0)) == pytest.approx(M.SCORE_FLOOR ** 0.25)
    assert summary_score(dict(base, content_consistency=0.0625)) == pytest.approx(0.5)


def test_wilson_interval_known_answers():
    from dsu_models.evaluation.evaluate import wilson_interval
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-3)


def test_partly_labeled_hidden_factor_reports_count_and_interval(data, oracles):
    """A hidden factor labeled on some rows only (evaluation-only) is judged on those rows."""
    train, test = data
    j = VARY.index("shape")
    labels = test.labels.clone()
    labels[torch.arange(len(labels)) % 4 != 0, j] = -1        # a quarter of the rows keep a label
    partial = InMemoryDataset(test.images, labels, test.factors, test.ids, test.name)
    r = evaluate(FakeModel(data, LABELED), train, partial, ECFG, oracles, log=lambda s: None)
    n = r["preserve_shape_n"]
    assert 0.15 * ECFG.pairs < n < 0.35 * ECFG.pairs
    assert r["preserve_shape_low"] < r["preserve_shape"] <= r["preserve_shape_high"] + 1e-12
    assert r["preserve_shape"] > 0.9 and "preserve_wall_hue_n" not in r  # a full column: no interval
    empty = labels.clone()
    empty[:, j] = -1
    r = evaluate(FakeModel(data, LABELED), train, InMemoryDataset(test.images, empty, test.factors),
                 ECFG, oracles, log=lambda s: None)
    assert r["preserve_shape_n"] == 0 and "preserve_shape" not in r


def test_confusion_matrices_count_asked_against_read(data, oracles):
    from dsu_models.evaluation.evaluate import evaluate_in_full
    ev = evaluate_in_full(FakeModel(data, LABELED), *data, ECFG, oracles, log=None)
    for k in LABELED:
        m = ev.confusion[k]
        assert m.shape == (10, 10) and int(m.sum()) == ECFG.pairs
        assert float(m.diagonal().sum()) / ECFG.pairs == pytest.approx(ev.metrics[f"swap_acc_{k}"])
    assert len(ev.worst.distance) == 8 and bool((ev.worst.distance[:-1] >= ev.worst.distance[1:]).all())
    assert ev.worst.content.dtype == torch.uint8 and ev.worst.back.shape == ev.worst.content.shape


def test_field_metrics_on_the_whole_code(results):
    """The perfect model's whole code (hidden indices from E, label codes from S) is the
    factors themselves; the random one's unknown part is noise and its S part the labels."""
    perfect, rnd = results["perfect"], results["random"]
    for key in ("dci_disentanglement", "dci_completeness", "dci_informativeness", "mig", "factorvae_score"):
        assert perfect[key] > 0.9, (key, perfect[key])
    # random: the hidden factors are in no dimension, so their predictors are at chance
    assert rnd["dci_informativeness"] < 0.8 and rnd["mig"] < 0.6
    assert rnd["factorvae_score"] < 0.8 < perfect["factorvae_score"]


class ConstantModel(FakeModel):
    """An encoder that outputs one image's code for every image."""

    def encode_unknown(self, images):
        return super().encode_unknown(images[:1]).expand(len(images), -1).clone()


def test_every_degenerate_model_fails_the_champion_bar(results, data, oracles):
    """Each degenerate model misses the default bar (ground-truth preservation, and again
    with the hidden factors' labels taken away, where content_consistency stands in);
    the perfect one meets it both ways."""
    from dsu_models.evaluation.metrics import champion_failures

    models = dict(results)
    for name, model in (("prototype", PrototypeModel(data, LABELED)), ("constant", ConstantModel(data, LABELED))):
        models[name] = evaluate(model, *data, ECFG, oracles, log=None)
    for name, r in models.items():
        unlabeled = {k: v for k, v in r.items() if not k.startswith("preserve")}
        if name == "perfect":
            assert champion_failures(r, ECFG) == [] and champion_failures(unlabeled, ECFG) == []
        else:
            assert champion_failures(r, ECFG), name
            assert champion_failures(unlabeled, ECFG), name
    assert champion_failures(models["unchanged"], ECFG)[0].startswith("swap_acc_mean")
    assert any(f.startswith("content_consistency") for f in champion_failures(
        {k: v for k, v in models["prototype"].items() if not k.startswith("preserve")}, ECFG))


def test_stage1_objective_prefers_unleaky_codes(data):
    perfect = evaluate_stage1(FakeModel(data, LABELED), *data, ECFG, log=lambda s: None)
    leaky = evaluate_stage1(FakeModel(data, LABELED, "labels"), *data, ECFG, log=lambda s: None)
    assert perfect["stage1_objective"] > 0.9 and leaky["stage1_objective"] < 0.5
    assert "summary" not in perfect and "swap_acc_mean" not in perfect


def test_no_labeled_factors(data, oracles):
    r = evaluate(FakeModel(data, []), *data, ECFG, oracles, log=lambda s: None)
    assert not any(k.startswith(("swap_", "leak_")) and k != "leak_excess_mean" for k in r)
    assert r["leak_excess_mean"] == 0.0 and "lenc_acc_mean" not in r
    per_factor = {k for k in r if k.startswith("preserve_")} - {"preserve_mean", "preserve_score"}
    assert per_factor == {f"preserve_{n}" for n in VARY}
    assert r["preserve_mean"] > 0.9 and r["summary"] > 0.8


def test_no_unknown_code(data, oracles):
    model = FakeModel(data, VARY)
    assert model.unknown_size == 0
    r = evaluate(model, *data, ECFG, oracles, log=lambda s: None)
    assert r["leak_excess_mean"] == 0.0 and r["disentangle_score"] == 1.0
    assert all(r[f"leak_{k}"] == r[f"leak_chance_{k}"] for k in VARY)
    assert "preserve_mean" not in r and r["swap_acc_mean"] > 0.9 and r["summary"] > 0.8


def test_model_with_unknown_factor_names_is_refused(data, oracles):
    model = FakeModel(data, LABELED)
    model.labeled_factors = ["floor_hue", "colour"]
    with pytest.raises(ValueError, match="colour"):
        evaluate(model, *data, ECFG, oracles, log=lambda s: None)


# ----------------------------------------------------------------- a real model


def test_real_tiny_model_end_to_end(tmp_path):
    inference = pytest.importorskip("dsu_models.inference")
    from dsu_models.data import load_builtin
    from dsu_models.train import run
    from tiny import tiny_config

    cfg = tiny_config("num_samples=400", "all_stages.iterations=4", "stage1.iterations=6")
    res = run(cfg, tmp_path / "run", log=lambda s: None)
    model = inference.DisUnknownModel.from_handoffs(
        res["stage1"], res.get("stage2"), res.get("lenc"), code_stats=res["distill"]["stats"], device="cpu")
    train, val, test = load_builtin("shapes3d", 8, num_samples=400, seed=cfg.seed)
    ecfg = EvaluateConfig(pairs=64, batch_size=32, oracle_epochs=1, oracle_samples=200, oracle_width=8,
                          probe_samples=200)
    with pytest.warns(OracleWarning):                     # 1 epoch at 8 px cannot read shapes3d
        oracles = load_or_train_oracles(train, test, ecfg, tmp_path / "cache", log=lambda s: None)
    r = evaluate(model, train, test, ecfg, oracles, log=lambda s: None)
    s1 = evaluate_stage1(inference.DisUnknownModel.from_handoffs(res["stage1"], device="cpu"),
                         train, test, ecfg, log=lambda s: None)
    for key in ("swap_acc_floor_hue", "preserve_object_hue", "leak_shape", "recon_psnr", "frechet",
                "lenc_acc_mean", "content_consistency", "dci_disentanglement", "factorvae_score", "summary"):
        assert math.isfinite(r[key]), key
    assert 0 < r["summary"] <= 1 and 0 < s1["stage1_objective"] <= 1
    # a barely trained model is a degenerate one: it does not earn the champion alias
    from dsu_models.evaluation.metrics import champion_failures
    assert champion_failures(r, ecfg)


def test_an_evaluation_only_factor_end_to_end(tmp_path):
    """A user's image folder whose CSV labels the wall's hue on a quarter of the images only,
    declared evaluation-only: training never reads it, and the evaluation reports its
    preservation on the labeled images with their count and interval, plus the label-free
    measures; the field's metrics need every label, so they are left out."""
    from PIL import Image

    from dsu_models.data import prepare, read_split
    from dsu_models.config import load_config
    from dsu_models.inference import DisUnknownModel
    from dsu_models.train import run

    data = make_split(300, seed=3)
    names = [f.name for f in data.factors]
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = ["file,floor_hue,object_hue,wall_hue"]
    for i in range(len(data)):
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
        y = data.labels[i]
        wall = str(int(y[names.index("wall_hue")])) if i % 4 == 0 else ""
        lines.append(f"{i}.png,{int(y[names.index('floor_hue')])},{int(y[names.index('object_hue')])},{wall}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    prepared = prepare("image_folder", tmp_path / "prepared", root=str(folder), eval_factors="wall_hue",
                       classes={"floor_hue": 10, "object_hue": 10, "wall_hue": 10})
    cfg = load_config(None, ["dataset=image_folder", f"data_path={prepared}", f"image_size={SIZE}",
                              "unknown_size=4", "architecture.conv_channels=[8]", "architecture.fc_features=16",
                              "all_stages.batch_size=8", "all_stages.iterations=4", "device=cpu"])
    assert cfg.labeled_factors == ["floor_hue", "object_hue"]           # never trained on
    res = run(cfg, tmp_path / "run", log=lambda s: None)
    model = DisUnknownModel.from_handoffs(res["stage1"], res.get("stage2"), res.get("lenc"),
                                          code_stats=res["distill"]["stats"], device="cpu")
    train, test = read_split(prepared, "train"), read_split(prepared, "test")
    ecfg = EvaluateConfig(pairs=200, batch_size=64, oracle_epochs=1, oracle_samples=None, oracle_width=8,
                          probe_samples=200)
    oracles = load_or_train_oracles(train, test, ecfg, tmp_path / "cache", log=lambda s: None)
    r = evaluate(model, train, test, ecfg, oracles, log=None)
    labeled_rows = int((test.labels[:, 2] >= 0).sum())
    assert 0 < r["preserve_wall_hue_n"] < ecfg.pairs and labeled_rows < len(test)
    assert 0 <= r["preserve_wall_hue_low"] <= r["preserve_wall_hue"] <= r["preserve_wall_hue_high"] + 1e-12
    assert 0 <= r["content_consistency"] <= 1 and "dci_disentanglement" not in r
    assert math.isfinite(r["summary"])

