"""Stage 1 (docs/method.md section 7): options, learning, gradient routing, checkpoints."""
from __future__ import annotations

import io

import pytest
import torch

from dsu_models.stages.common import NonFiniteLossError
from dsu_models.stages.stage1 import Stage1, rolled_labels
from tiny import tiny_batch, tiny_config, tiny_factors


def make(*overrides: str, seed: int = 0) -> Stage1:
    torch.manual_seed(seed)
    cfg = tiny_config(*overrides)
    return Stage1(cfg, tiny_factors(cfg))


OPTIONS = [
    [], ["stage1.cla1_mode=image"], ["stage1.cla1_mode=code"], ["stage1.cla1_adv_mode=ll"],
    ["stage1.cla1_adv_mode=prior", "stage1.cla1_target=0.02"],
    ["stage1.gen_conv_adv=true"], ["stage1.gen_fc_adv=false"], ["stage1.enc_freeze=3"],
    ["stage1.emb_freeze=3"], ["stage1.cla1_ramp=[2, 6]"], ["stage1.ubatch_ramp=[2, 6]"],
    ["stage1.ucode_ramp=[2, 6]"],
    ["stage1.zero_init=false"],
    ["stage1.lr_ramp=0"], ["nested_dropout=false"], ["stage1.random_offset=false"],
    ["labeled_factors=[]"], ["labeled_factors=null"],
]


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_every_option_trains(overrides):
    stage = make(*overrides, "stage1.lr=2e-3", "stage1.emb_lr=2e-3")
    batch = tiny_batch(stage.cfg)
    history = [stage.train_step(batch) for _ in range(30)]
    assert stage.iteration == 30
    first = sum(h["rec"] for h in history[:5]) / 5
    last = sum(h["rec"] for h in history[-5:]) / 5
    assert last < first, (first, last)
    grids = stage.sample_images(batch, n=4)
    assert grids["reconstruction"].dtype == torch.uint8
    if stage.adversarial:
        assert "swap" in grids and "cla_nll" in history[-1]


def test_rolled_labels_never_keep_a_row():
    labels = torch.arange(10)[:, None].repeat(1, 3)
    for _ in range(20):
        alt = rolled_labels(labels)
        assert (alt != labels).all()
        assert (alt.sort(0).values == labels).all()


def _grads_after_step(weight: float, *overrides: str) -> dict[str, dict[str, torch.Tensor]]:
    stage = make(f"stage1.cla1_weight={weight}", *overrides, seed=1)
    torch.manual_seed(5)
    stage.train_step(tiny_batch(stage.cfg))
    out = {}
    for group, module in (("conv", stage.generator.conv), ("fc", stage.generator.fc),
                          ("classifier", stage.classifier), ("encoder", stage.encoder)):
        out[group] = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in module.named_parameters()}
    return out


def _same(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[n], b[n], atol=1e-7, rtol=1e-5) for n in a)


@pytest.mark.parametrize("conv_adv", [False, True])
def test_gradient_routing(conv_adv):
    """The adversarial term reaches G's conv part only with gen_conv_adv; it always
    reaches G's FC part and E; C's gradient comes from its own NLL only."""
    flag = f"stage1.gen_conv_adv={str(conv_adv).lower()}"
    with_adv, without = _grads_after_step(0.5, flag), _grads_after_step(0.0, flag)
    assert _same(with_adv["conv"], without["conv"]) is (not conv_adv)
    assert not _same(with_adv["fc"], without["fc"])
    assert not _same(with_adv["encoder"], without["encoder"])
    assert _same(with_adv["classifier"], without["classifier"])


def test_gen_fc_adv_false_keeps_fc_out_of_adversary():
    with_adv = _grads_after_step(0.5, "stage1.gen_fc_adv=false")
    without = _grads_after_step(0.0, "stage1.gen_fc_adv=false")
    assert _same(with_adv["fc"], without["fc"]) and _same(with_adv["conv"], without["conv"])
    assert not _same(with_adv["encoder"], without["encoder"])


def test_encoder_frozen_until_enc_freeze():
    stage = make("stage1.enc_freeze=4", "stage1.lr_ramp=0")
    before = [p.clone() for p in stage.encoder.parameters()]
    batch = tiny_batch(stage.cfg)
    for _ in range(4):
        stage.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, stage.encoder.parameters()))
    stage.train_step(batch)
    assert not all(torch.equal(a, b) for a, b in zip(before, stage.encoder.parameters()))


def test_cla1_ramp_weight():
    stage = make("stage1.cla1_ramp=[2, 6]", "stage1.cla1_weight=0.8")
    weights = []
    batch = tiny_batch(stage.cfg)
    for _ in range(8):
        weights.append(stage.train_step(batch)["adv_weight"])
    assert weights[:2] == [0.0, 0.0]
    assert weights[2] == pytest.approx(0.2) and weights[5:] == [pytest.approx(0.8)] * 3


@pytest.mark.parametrize("term", ["ubatch", "ucode"])
def test_a_code_loss_ramp_weighs_its_loss(term):
    """``ubatch_ramp`` and ``ucode_ramp`` (options): the unknown code's batch or
    code loss enters the objective at 0 before t1, linearly to full at t2; the
    other terms keep their weights."""
    other = {"ubatch": "ucode", "ucode": "ubatch"}[term]
    stage = make(f"stage1.{term}_ramp=[2, 6]", f"stage1.{term}_weight=0.4", "labeled_factors=[]",
                 "stage1.zero_init=false")   # a code away from the prior: code losses above 0
    s = stage.scfg
    batch = tiny_batch(stage.cfg)
    shares = []
    for _ in range(8):
        t = stage.train_step(batch)
        rest = t["total"] - s.rec_weight * t["rec"] - getattr(s, f"{other}_weight") * t[other]
        assert t[term] > 1e-3
        shares.append(rest / (getattr(s, f"{term}_weight") * t[term]))
    assert shares == pytest.approx([0, 0, .25, .5, .75, 1, 1, 1], abs=1e-4)
    assert stage.steady_from() >= 6


def test_checkpoint_round_trip_continues_identically():
    batches = [tiny_batch(make().cfg, seed=s) for s in range(6)]
    straight = make(seed=3)
    for b in batches[:3]:
        straight.train_step(b)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    expected = [straight.train_step(b) for b in batches[3:]]

    resumed = make(seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.iteration == 3
    got = [resumed.train_step(b) for b in batches[3:]]
    assert got == expected


def test_non_finite_loss_names_stage_iteration_and_term():
    stage = make()
    batch = tiny_batch(stage.cfg)
    stage.train_step(batch)
    batch["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        stage.train_step(batch)
    assert info.value.stage == "stage1" and info.value.iteration == 1
    assert "stage1" in str(info.value) and info.value.term in str(info.value)


def test_handoff_carries_weights_and_config():
    stage = make()
    handoff = stage.handoff()
    assert set(handoff["weights"]) == {"encoder", "generator", "embedders"}
    assert handoff["config"]["labeled_factors"] == ["floor_hue", "shape"]
    buffer = io.BytesIO()
    torch.save(handoff, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["stage"] == "stage1"


def _two_pass_classifier_losses(stage: Stage1):
    """The straightforward routing: C on detached inputs for its NLL, then C again
    with detached parameters for the adversarial loss (what one pass must equal)."""
    from dsu_models import losses
    from dsu_models.stages.common import detached_call

    def fn(x, y, u, u_mask, weight, weight_t, z_cross, top_cross):
        s = stage.scfg
        x_cross = stage._cross_image(z_cross, top_cross) if s.cla1_mode != "code" else None
        nll = sum(-lp.gather(1, y[:, k:k + 1]).mean()
                  for k, lp in enumerate(stage.classifier(
                      x_cross.detach() if x_cross is not None else None, u.detach(), u_mask)))
        adv = sum(losses.adversarial_nlu(lp, y[:, k], stage.freqs[k]) if s.cla1_adv_mode == "nlu"
                  else losses.adversarial_ll(lp, y[:, k]) if s.cla1_adv_mode == "ll"
                  else losses.adversarial_prior(lp, stage.freqs[k])
                  for k, lp in enumerate(detached_call(stage.classifier, x_cross, u, u_mask)))
        return nll, adv.detach(), x.new_zeros(()), weight_t * adv, x.new_zeros(())
    return fn


def _step_metrics_and_grads(monkeypatch, overrides, change=lambda stage: None):
    """One seeded stage-1 step (no optimizer step) of a stage that ``change``
    altered: its metrics and every parameter's gradient."""
    stage = make("stage1.cla1_weight=0.7", *overrides, seed=3)
    change(stage)
    for opt in stage.optimizers.values():
        monkeypatch.setattr(opt, "step", lambda *a, **k: None)
    torch.manual_seed(11)
    metrics = stage.train_step(tiny_batch(stage.cfg))
    grads = {f"{m}.{n}": p.grad.clone() for m, module in stage.models.items()
             for n, p in module.named_parameters() if p.grad is not None}
    return metrics, grads


def _assert_same_step(first, second):
    (m1, g1), (m2, g2) = first, second
    for key in ("rec", "cla_nll", "adv", "total"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-6), key
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides", [[], ["stage1.cla1_mode=image"], ["stage1.gen_conv_adv=true"],
                                       ["stage1.random_offset=false"]],
                         ids=lambda o: ",".join(o) or "default")
def test_shared_fc_pass_equals_two_passes(overrides, monkeypatch):
    """The reconstruction and the cross image through G's FC part as one batch:
    the same losses and the same gradient on every parameter as two passes."""
    calls = []

    def sharing(shared: bool):
        def change(stage):
            stage.share_fc_pass = shared
            stage.generator.fc.register_forward_hook(lambda m, i, o: calls.append((shared, i[0].shape[0])))
        return change

    shared = _step_metrics_and_grads(monkeypatch, overrides, sharing(True))
    apart = _step_metrics_and_grads(monkeypatch, overrides, sharing(False))
    b = tiny_batch(make(seed=3).cfg)["image"].shape[0]
    assert calls == [(True, 2 * b), (False, b), (False, b)]
    _assert_same_step(shared, apart)


@pytest.mark.parametrize("overrides", [[], ["stage1.cla1_mode=image"], ["stage1.cla1_mode=code"],
                                       ["stage1.cla1_adv_mode=ll", "stage1.gen_conv_adv=true"],
                                       ["stage1.cla1_adv_mode=prior"],
                                       ["stage1.gen_fc_adv=false"]],
                         ids=lambda o: ",".join(o) or "default")
def test_one_classifier_pass_equals_two(overrides, monkeypatch):
    """Same losses and the same gradient on every parameter as running C twice."""
    def two_pass(stage):
        stage._classifier_losses = _two_pass_classifier_losses(stage)

    _assert_same_step(_step_metrics_and_grads(monkeypatch, overrides),
                      _step_metrics_and_grads(monkeypatch, overrides, two_pass))


def test_live_leakage_raises_the_adversary_while_c_reads_the_labels():
    """``cla1_target``: the adversary's weight grows while C reads the labels
    above the target, stays at ``cla1_weight`` without the option, falls back
    when the leakage drops, and the multiplier travels in the checkpoint."""
    from dsu_models.stages import stage1 as stage1_module

    fixed = make("stage1.cla1_ramp=[0, 2]")
    adaptive = make("stage1.cla1_ramp=[0, 2]", "stage1.cla1_target=0.05")
    batch = tiny_batch(adaptive.cfg)
    for stage in (fixed, adaptive):
        for _ in range(3):
            stage.train_step(batch)
    assert "leak" in fixed.train_step(batch)
    # C reads every label: the leakage is 1 and the multiplier climbs
    adaptive.leak_mean.fill_(1.0)
    weights = [adaptive.train_step(batch)["adv_weight"] for _ in range(4)]
    assert weights[-1] > weights[1] > weights[0] >= fixed.scfg.cla1_weight
    assert fixed.train_step(batch)["adv_weight"] == pytest.approx(fixed.scfg.cla1_weight)
    state = adaptive.state_dict()
    again = make("stage1.cla1_ramp=[0, 2]", "stage1.cla1_target=0.05")
    again.load_state_dict(state)
    assert float(again.leak_log_scale) == pytest.approx(float(adaptive.leak_log_scale))
    # no leakage: the multiplier falls back to 1, never below
    adaptive.leak_mean.fill_(0.0)
    adaptive.leak_log_scale.fill_(stage1_module.LEAK_RATE * 0.01)
    for _ in range(3):
        metrics = adaptive.train_step(batch)
    assert metrics["adv_weight"] == pytest.approx(adaptive.scfg.cla1_weight)


def test_live_leakage_is_zero_at_chance_and_one_when_every_label_is_read():
    stage = make("stage1.cla1_mode=code")
    batch = stage.to_device(tiny_batch(stage.cfg))
    y = batch["labels"]
    u = torch.zeros(y.shape[0], stage.cfg.unknown_size)

    def reading(correct: bool):
        def classifier(x_cross, c_u, u_mask):
            return [torch.nn.functional.one_hot(y[:, k] if correct else torch.full_like(y[:, k], -1) + 1,
                                                 n).float().log_softmax(1)
                    for k, n in enumerate([f.classes for f in stage.factors])]
        return classifier

    stage.classifier.forward = reading(True)
    *_, leak = stage._classifier_losses(batch["image"], y, u, None, 0.0, torch.zeros(()), None, None)
    assert float(leak) == pytest.approx(1.0)
    stage.chance = torch.zeros_like(stage.chance)   # a guess that is never right scores 0 over zero chance
    stage.classifier.forward = lambda *a: [torch.full((y.shape[0], f.classes), -9.0).scatter(
        1, ((y[:, k] + 1) % f.classes)[:, None], 0.0) for k, f in enumerate(stage.factors)]
    *_, leak = stage._classifier_losses(batch["image"], y, u, None, 0.0, torch.zeros(()), None, None)
    assert float(leak) == pytest.approx(0.0)

