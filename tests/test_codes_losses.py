"""Known-answer tests for codes, sampling, the label embedder and the losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from dsu_models import codes, losses
from dsu_models.embedder import LabelEmbedder, nearest_class


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- keep probabilities


def test_keep_probabilities_golden():
    got = codes.keep_probabilities([0.9, 0.8, 0.7, 0.1], 8)
    want = [1, 0.9, 0.8, 0.7, 0.4304, 0.2646, 0.1627, 0.1]
    assert got == pytest.approx(want, abs=5e-5)


def test_keep_probabilities_short_and_none():
    assert codes.keep_probabilities([0.9, 0.8, 0.7], 3) == [1.0, 0.9, 0.8]
    assert codes.keep_probabilities([0.2], 2) == [1.0, 0.2]
    assert codes.keep_probabilities(None, 5) is None


# ---------------------------------------------------------------- stratified noise


def test_stratified_uniform_one_sample_per_stratum():
    batch, dim = 97, 13
    u = codes.stratified_uniform(batch, dim, generator=_gen())
    assert u.shape == (batch, dim) and u.dtype == torch.float64
    assert bool((u > 0).all()) and bool((u < 1).all())
    strata = torch.floor(u * batch).long().sort(dim=0).values
    assert torch.equal(strata, torch.arange(batch).unsqueeze(1).expand(batch, dim))
    # columns are permuted independently, not all alike
    assert not torch.equal(u.argsort(dim=0)[:, 0], u.argsort(dim=0)[:, 1])


def test_stratified_normal_is_standard_normal():
    z = codes.stratified_normal(20000, 4, generator=_gen(1), dtype=torch.float32)
    assert z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    assert z.mean(0).abs().max() < 0.01  # stratification makes the mean very precise
    assert (z.std(0) - 1).abs().max() < 0.02
    assert ((z.abs() < 1.0).float().mean(0) - 0.6827).abs().max() < 0.01


# ---------------------------------------------------------------- nested dropout


def test_nested_dropout_rates_and_nesting():
    p = torch.tensor(codes.keep_probabilities([0.9, 0.5, 0.1], 6))
    mask = codes.nested_dropout_mask(p, 40000, generator=_gen(2))
    assert mask.shape == (40000, 6)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.mean(0) - p).abs().max() < 0.01
    # p non-increasing -> kept dims form a prefix: a drop is never followed by a keep
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())
    assert bool((mask[:, 0] == 1).all())


def test_sample_code_dropout_and_eval():
    mean = torch.full((512, 4), 5.0, requires_grad=True)
    std = torch.full((512, 4), 1e-3)
    kp = [1.0, 0.5, 0.5, 0.0]
    code, mask = codes.sample_code(mean, std, kp, training=True, generator=_gen(3))
    assert code.shape == mask.shape == (512, 4)
    assert torch.allclose(code[mask.bool()], torch.tensor(5.0), atol=0.01)
    dropped = code[~mask.bool()]
    assert dropped.abs().mean() < 2.0  # prior draws, not near 5
    assert bool((mask[:, 3] == 0).all()) and bool((mask[:, 0] == 1).all())
    code.sum().backward()
    assert torch.equal(mean.grad, mask)  # no gradient through dropped dims

    code, mask = codes.sample_code(mean, std, kp, training=False)
    assert bool((mask == 1).all()) and torch.allclose(code, mean, atol=0.01)
    code, mask = codes.sample_code(mean, std, None, training=True)
    assert bool((mask == 1).all())

    empty = torch.zeros(8, 0)
    code, mask = codes.sample_code(empty, empty, None, training=True)
    assert code.shape == mask.shape == (8, 0)


def test_generator_input_layout():
    u, l = torch.randn(3, 2), torch.randn(3, 1)
    mu, ml = torch.tensor([[1.0, 0.0]] * 3), torch.ones(3, 1)
    out = codes.generator_input([u, l], [mu, ml])
    assert torch.equal(out, torch.cat([u, l, 1 - mu, 1 - ml], dim=1))


# ---------------------------------------------------------------- code losses


def test_kl_to_prior_and_code_loss_match_torch():
    g = _gen(4)
    mean, std = torch.randn(16, 5, generator=g), torch.rand(16, 5, generator=g) + 0.1
    ref = kl_divergence(Normal(mean, std), Normal(0.0, 1.0))
    assert torch.allclose(codes.kl_to_prior(mean, std), ref, atol=1e-6)
    kp = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.1])
    assert torch.allclose(codes.code_loss(mean, std, kp), (ref.mean(0) * kp).sum(), atol=1e-5)
    assert torch.allclose(codes.code_loss(mean, std, None), ref.mean(0).sum(), atol=1e-5)


def test_batch_loss_by_hand():
    mean = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 2.0]])
    std = torch.tensor([[1.0, 0.5], [1.0, 0.5], [2.0, 0.5]])
    # dim 0: bm 2, var (4+0+4)/2 = 4, mean std^2 = 2 -> bv 6
    # dim 1: bm 2, var (1+1+0)/2 = 1, mean std^2 = 0.25 -> bv 1.25
    want0 = 0.5 * (4 + 6 - math.log(6) - 1)
    want1 = 0.5 * (4 + 1.25 - math.log(1.25) - 1)
    assert codes.batch_loss(mean, std, None).item() == pytest.approx(want0 + want1, rel=1e-6)
    got = codes.batch_loss(mean, std, [1.0, 0.5]).item()
    assert got == pytest.approx(want0 + 0.5 * want1, rel=1e-6)


# ---------------------------------------------------------------- code statistics


def test_code_statistics_chunks_and_definitions():
    g = _gen(5)
    mix = torch.randn(3, 3, generator=g)
    means = torch.randn(1000, 3, generator=g) @ mix + torch.tensor([1.0, -2.0, 0.5])
    stds = torch.rand(1000, 3, generator=g) + 0.2
    whole = codes.code_statistics(means, stds, chunk_size=10**6)
    chunked = codes.code_statistics(means, stds, chunk_size=37)
    acc = codes.CodeStatsAccumulator()
    for lo, hi in [(0, 1), (1, 500), (500, 1000)]:
        acc.update(means[lo:hi], stds[lo:hi])
    manual = acc.finalize()
    for key, value in whole.items():
        assert value.dtype == torch.float64
        assert torch.allclose(value, chunked[key], atol=1e-10), key
        assert torch.allclose(value, manual[key], atol=1e-10), key

    m64, v64 = means.double(), stds.double().square()
    var_means = m64.var(0, correction=0)
    total = var_means + v64.mean(0)
    assert torch.allclose(whole["mean"], m64.mean(0))
    assert torch.allclose(whole["std"], total.sqrt())
    assert torch.allclose(whole["variance_ratio"], var_means / total)
    cov = torch.cov(m64.T, correction=0) / torch.outer(total.sqrt(), total.sqrt())
    cov = cov + torch.diag(v64.mean(0) / total)
    vals, vecs = whole["eigenvalues"], whole["eigenvectors"]
    assert bool((vals[:-1] >= vals[1:]).all())
    assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, cov, atol=1e-10)
    assert torch.allclose(torch.diagonal(cov), torch.ones(3, dtype=torch.float64))


def test_sample_from_statistics_reproduces_fitted_gaussian():
    g = _gen(6)
    means = torch.randn(4000, 3, generator=g) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0.0, 0.0, 0.4]]) + torch.tensor([3.0, 0.0, -1.0])
    stds = torch.full((4000, 3), 0.3)
    stats = codes.code_statistics(means, stds)
    sample = codes.sample_from_statistics(stats, 50000, generator=g, dtype=torch.float64)
    assert sample.shape == (50000, 3)
    assert torch.allclose(sample.mean(0), stats["mean"], atol=0.03)
    assert torch.allclose(sample.std(0), stats["std"], rtol=0.02)
    # the correlation of the mixture is reproduced too
    m64 = means.double()
    total_cov = torch.cov(m64.T, correction=0) + torch.diag(torch.full((3,), 0.09, dtype=torch.float64))
    assert torch.allclose(torch.cov(sample.T), total_cov, atol=0.05 * total_cov.abs().max())


# ---------------------------------------------------------------- label embedder


def _perturbed(init: str = "zero") -> LabelEmbedder:
    emb = LabelEmbedder(5, 3, init=init, frequencies=torch.tensor([5.0, 1.0, 2.0, 1.0, 1.0]))
    g = _gen(7)
    with torch.no_grad():
        emb.mean.add_(torch.randn(5, 3, generator=g))
        emb.log_std.add_(0.5 * torch.randn(5, 3, generator=g))
    return emb


def test_embedder_mixture_is_normalised():
    emb = _perturbed()
    means, stds = emb.normalized()
    f = emb.frequencies.unsqueeze(1)
    assert torch.allclose((f * means).sum(0), torch.zeros(3), atol=1e-6)
    var = (f * means.square()).sum(0) + (f * stds.square()).sum(0)
    assert torch.allclose(var, torch.ones(3), atol=1e-5)
    labels = torch.tensor([0, 3, 3, 1])
    out_mean, out_std = emb(labels)
    assert torch.equal(out_mean, means[labels]) and torch.equal(out_std, stds[labels])


def test_embedder_zero_init_is_prior():
    means, stds = LabelEmbedder(4, 2).normalized()
    assert torch.allclose(means, torch.zeros(4, 2)) and torch.allclose(stds, torch.ones(4, 2))


def test_embedder_linear_and_circle_init():
    lin = LabelEmbedder(4, 3, init="linear")
    assert torch.allclose(lin.mean[:, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(lin.log_std[:, 0], torch.full((4,), math.log(0.25)))
    assert not lin.mean[:, 1:].any() and not lin.log_std[:, 1:].any()

    circ = LabelEmbedder(6, 3, init="circle")
    angle = 2 * math.pi * torch.arange(6) / 6
    assert torch.allclose(circ.mean[:, 0], torch.cos(angle), atol=1e-6)
    assert torch.allclose(circ.mean[:, 1], torch.sin(angle), atol=1e-6)
    assert torch.allclose(circ.log_std[:, :2], torch.full((6, 2), math.log(math.sin(math.pi / 6))))
    assert not circ.mean[:, 2].any() and not circ.log_std[:, 2].any()


def test_embedder_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        LabelEmbedder(6, 1, init="circle")
    with pytest.raises(ValueError, match="init"):
        LabelEmbedder(6, 2, init="spiral")
    with pytest.raises(ValueError, match="shape"):
        LabelEmbedder(3, 2).update_frequencies(torch.ones(4))


def test_embedder_frequencies_update_and_state_dict():
    emb = LabelEmbedder(3, 2)
    assert torch.allclose(emb.frequencies, torch.full((3,), 1 / 3))
    emb.update_frequencies(torch.tensor([2.0, 1.0, 1.0]))
    assert torch.allclose(emb.frequencies, torch.tensor([0.5, 0.25, 0.25]))
    state = emb.state_dict()
    assert torch.equal(state["frequencies"], emb.frequencies)
    other = LabelEmbedder(3, 2)
    other.load_state_dict(state)
    assert torch.equal(other.frequencies, emb.frequencies)
    assert "frequencies" not in dict(emb.named_parameters())


def test_embedder_code_loss_matches_torch():
    emb = _perturbed("linear")
    means, stds = emb.normalized()
    kl = kl_divergence(Normal(means, stds), Normal(0.0, 1.0))
    kp = torch.tensor([1.0, 0.5, 0.25])
    want = (emb.frequencies.unsqueeze(1) * kl).sum(0)
    assert torch.allclose(emb.code_loss(kp), (want * kp).sum(), atol=1e-5)
    assert torch.allclose(emb.code_loss(), want.sum(), atol=1e-5)
    emb.code_loss(kp).backward()
    assert emb.mean.grad is not None and emb.log_std.grad is not None


def test_nearest_class_recovers_labels():
    emb = _perturbed("circle")
    labels = torch.tensor([4, 0, 2, 2, 1, 3])
    assert torch.equal(nearest_class(emb, emb(labels)[0]), labels)


# ---------------------------------------------------------------- losses


def test_gaussian_kl_matches_torch():
    g = _gen(8)
    mp, mq = torch.randn(2, 6, 4, generator=g)
    sp, sq = torch.rand(2, 6, 4, generator=g) + 0.1
    ref = kl_divergence(Normal(mp, sp), Normal(mq, sq))
    assert torch.allclose(losses.gaussian_kl(mp, sp, mq, sq), ref, atol=1e-5)
    got = losses.labeled_encoder_loss([(mp, sp), (mq, sq)], [(mq, sq), (mp, sp)])
    want = ref.sum(1).mean() + kl_divergence(Normal(mq, sq), Normal(mp, sp)).sum(1).mean()
    assert torch.allclose(got, want, atol=1e-5)


def test_reconstruction_nll_matches_normal_log_prob():
    g = _gen(9)
    x, x_hat = torch.rand(2, 3, 2, 4, 4, generator=g) * 2 - 1
    s = torch.rand(3, generator=g) + 0.05
    want = -Normal(x_hat, s.view(3, 1, 1, 1)).log_prob(x).mean()
    assert torch.allclose(losses.reconstruction_nll(x_hat, x, s), want, atol=1e-5)
    assert torch.allclose(losses.reconstruction_nll(x_hat, x, s.view(3, 1)), want, atol=1e-5)


def test_adversarial_nlu_and_ll_hand_case():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 2])
    freq = torch.tensor([0.5, 0.3, 0.2])
    logp = probs.log()
    # weights 1/0.5 - 1 = 1 and 1/0.2 - 1 = 4; 1 - p = 0.5 and 0.2
    want = -(1 * math.log(0.5) + 4 * math.log(0.2)) / 2
    assert losses.adversarial_nlu(logp, labels, freq).item() == pytest.approx(want, rel=1e-5)
    assert losses.adversarial_ll(logp, labels).item() == pytest.approx(
        (math.log(0.5) + math.log(0.8)) / 2, rel=1e-6)
    # p(y) = 1 exactly: clamped at 1e-8, finite
    sure = torch.log(torch.tensor([[1.0, 0.0]]))
    got = losses.adversarial_nlu(sure, torch.tensor([0]), torch.tensor([0.5, 0.5]))
    assert got.item() == pytest.approx(-math.log(1e-8), rel=1e-5)


def test_adversarial_nlu_gradient_is_finite_near_certainty():
    logits = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)
    loss = losses.adversarial_nlu(F.log_softmax(logits, 1), torch.tensor([0]), torch.tensor([0.5, 0.25, 0.25]))
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(logits.grad).all())


def test_lsgan_losses():
    d_real, d_fake = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert losses.lsgan_d_loss(d_real, d_fake).item() == pytest.approx(0.5 + 2.0)
    assert losses.lsgan_g_loss(d_fake).item() == pytest.approx(1.0)


def test_classifier_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0, 5.0], [0.0, 1.0, 0.0, -1.0]])  # n = 3 (+1 fake)
    labels = torch.tensor([0, 1])
    short = logits[:, :3].log_softmax(1)
    want = -(short[0, 0] + short[1, 1]) / 2
    assert torch.allclose(losses.classifier_nll(logits, labels, classes=3), want)
    full = logits.log_softmax(1)
    assert torch.allclose(losses.cla2_real_loss(logits, labels), -(full[0, 0] + full[1, 1]) / 2)
    assert torch.allclose(losses.cla2_generator_loss(logits, labels), -(full[0, 0] + full[1, 1]) / 2)
    p = full.exp()
    want_fake = -(torch.log(1 - p[0, 0]) + torch.log(1 - p[1, 1])) / 2
    assert torch.allclose(losses.cla2_fake_loss(logits, labels), want_fake, atol=1e-6)


def test_match_loss():
    mean_hat = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    std = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # row 0: 1 + 1 = 2; row 1: 1 + 0.25 = 1.25
    assert losses.match_loss(mean_hat, target, std).item() == pytest.approx(1.625)


def test_adversarial_prior_is_zero_only_at_the_class_frequencies():
    freq = torch.tensor([0.5, 0.3, 0.2])
    at_prior = freq.log().expand(4, 3)
    assert losses.adversarial_prior(at_prior, freq).item() == pytest.approx(0.0, abs=1e-6)
    right = torch.log_softmax(torch.tensor([[9.0, 0.0, 0.0]] * 4), 1)
    wrong = torch.log_softmax(torch.tensor([[0.0, 9.0, 0.0]] * 4), 1)
    # a confidently wrong C scores well on nlu but is as far from the prior as a right one
    labels = torch.zeros(4, dtype=torch.long)
    assert losses.adversarial_nlu(wrong, labels, freq) < losses.adversarial_nlu(at_prior, labels, freq)
    assert losses.adversarial_prior(wrong, freq) > 1.0 and losses.adversarial_prior(right, freq) > 1.0
    # by hand: KL(f || p) for one row
    p = torch.tensor([[0.2, 0.2, 0.6]])
    want = (freq * (freq / p[0]).log()).sum()
    assert losses.adversarial_prior(p.log(), freq).item() == pytest.approx(want.item(), rel=1e-5)
