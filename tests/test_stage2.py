"""Stage 2 (docs/method.md section 8): options, learning, gradient routing,
checkpoints, non-finite losses. Upstream hand-offs are built from freshly
initialised networks, so these tests do not depend on the other stages."""
from __future__ import annotations

import io

import pytest
import torch

from dsu_models import codes
from dsu_models.nn import builders
from dsu_models.stages.common import NonFiniteLossError
from dsu_models.stages.stage2 import Stage2
from tiny import tiny_batch, tiny_config, tiny_factors


pytestmark = pytest.mark.usefixtures("one_thread")


def upstream_for(cfg) -> dict:
    """Stage-1 and classifier hand-offs of fresh networks, code stats of random codes."""
    factors = tiny_factors(cfg)
    weights = {"generator": builders.build_generator(cfg).state_dict()}
    if cfg.labeled_factors:
        weights["embedders"] = builders.build_embedders(cfg, factors).state_dict()
    if cfg.unknown_size:
        weights["encoder"] = builders.build_encoder(cfg, [cfg.unknown_size], True).state_dict()
    classifier = None
    if cfg.labeled_factors:
        r1 = builders.build_image_classifier(cfg, extra_fake=True)
        classifier = {"stage": "classifier", "config": cfg.to_dict(), "iteration": 5,
                      "weights": {"classifier": r1.state_dict()}}
    m = cfg.unknown_size
    stats = codes.code_statistics(torch.randn(64, m) * 0.8, torch.rand(64, m) * 0.5 + 0.1) if m else None
    return {"stage1": {"stage": "stage1", "config": cfg.to_dict(), "iteration": 5, "weights": weights},
            "classifier": classifier, "code_stats": stats}


def make(*overrides: str, seed: int = 0) -> tuple[Stage2, dict]:
    torch.manual_seed(seed)
    cfg = tiny_config(*overrides)
    upstream = upstream_for(cfg)
    return Stage2(cfg, tiny_factors(cfg), upstream, device="cpu"), upstream


def batch_for(cfg, seed: int = 0) -> dict:
    batch = tiny_batch(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    m = cfg.unknown_size
    batch["mu"] = torch.randn(8, m, generator=g)
    batch["sigma"] = torch.rand(8, m, generator=g) * 0.3 + 0.05
    return batch


def expected_terms(stage: Stage2) -> set[str]:
    s, k = stage.scfg, stage.num_labeled
    keys = {"d_real", "d_fake", "g_dis", "total"}
    keys |= {"rec"} if stage.rec_branch else set()
    keys |= {"lcode"} if k else set()
    keys |= {"lbatch"} if k and not s.use_embedding else set()
    keys |= {"match"} if s.unknown_mode == "mse" and stage.unknown_size else set()
    keys |= {"r_real", "r_fake"} if k and s.cla2_adv else set()
    keys |= {"g_cla"} if k else set()
    keys |= {"r1"} if s.r1_weight > 0 else set()
    return keys


OPTIONS = [
    [], ["stage2.unknown_mode=mse"], ["stage2.random_ucode=true"],
    ["stage2.use_embedding=false"], ["stage2.cla2_adv=false"], ["stage2.has_rec_branch=false"],
    ["stage2.fake_reflect=true"], ["stage2.random_offset=false"], ["nested_dropout=false"],
    ["stage2.use_embedding=false", "stage2.unknown_mode=mse", "stage2.fake_reflect=true"],
    ["labeled_factors=[]"], ["labeled_factors=[]", "stage2.random_ucode=true"],
    ["labeled_factors=[]", "stage2.random_ucode=true", "stage2.has_rec_branch=false",
     "stage2.unknown_mode=mse"],
    ["labeled_factors=null"], ["labeled_factors=null", "stage2.unknown_mode=mse",
                               "stage2.fake_reflect=true"],
    ["stage2.ema_decay=0.99", "stage2.dis_lr=0.0002"],
    ["stage2.ema_decay=0.99", "stage2.use_embedding=false"], ["labeled_factors=[]", "stage2.ema_decay=0.99"],
    ["stage2.r1_weight=1.0"], ["stage2.r1_weight=1.0", "stage2.unknown_mode=mse", "stage2.fake_reflect=true"],
]


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_every_option_runs(overrides):
    stage, _ = make(*overrides)
    batch = batch_for(stage.cfg)
    for _ in range(3):
        terms = stage.train_step(batch)
    assert stage.iteration == 3
    assert set(terms) == expected_terms(stage)
    grids = stage.sample_images(batch, n=4)
    assert grids["reconstruction"].dtype == torch.uint8
    assert ("swap" in grids) == bool(stage.num_labeled and stage.unknown_size)

    handoff = stage.handoff()
    assert handoff["stage"] == "stage2" and handoff["iteration"] == 3
    want = {"generator"}
    if stage.num_labeled:
        want.add("embedders" if stage.scfg.use_embedding else "label_encoder")
    assert set(handoff["weights"]) == want
    assert all(v.device.type == "cpu" for w in handoff["weights"].values() for v in w.values())
    builders.build_generator(stage.cfg).load_state_dict(handoff["weights"]["generator"])

    images = stage.generate(batch["mu"][:2] if stage.unknown_size else None,
                            [m[:2] for m in stage.label_means(batch["image"], batch["labels"])])
    assert images.shape == (2, *batch["image"].shape[1:])


def test_fixed_batch_lowers_rec_loss():
    stage, _ = make("stage2.lr=1e-3", "stage2.emb_lr=1e-3")
    batch = batch_for(stage.cfg)
    history = [stage.train_step(batch)["rec"] for _ in range(30)]
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < first - 0.1, history


def test_cross_codes_roll_each_factor_with_its_labels():
    stage, _ = make("nested_dropout=false")
    n, m_u = 8, stage.unknown_size
    size = stage.keep.shape[0]
    rows = torch.arange(n, dtype=torch.float32)
    code = rows[:, None].repeat(1, size)
    y = torch.arange(n)[:, None].repeat(1, stage.num_labeled)
    for _ in range(10):
        code_alt, mask_alt, y_alt, u_cross, target = stage._cross_codes(code, torch.ones_like(code),
                                                                         y, code[:, :m_u])
        assert (y_alt != y).all()
        assert torch.equal(code_alt[:, :m_u], code[:, :m_u])  # u is not rolled
        for k in range(stage.num_labeled):
            cols = (stage.segment == k + 1).nonzero().squeeze(1)
            assert torch.equal(code_alt[:, cols], y_alt[:, k:k + 1].float().expand(n, len(cols)))


def _params(module) -> list[torch.nn.Parameter]:
    return list(module.parameters())


def _no_grad(module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in module.parameters())


@pytest.mark.parametrize("mode", ["dis", "mse"])
def test_gradient_routing(mode):
    stage, upstream = make(f"stage2.unknown_mode={mode}", "stage2.fake_reflect=true")
    batch = stage.to_device(batch_for(stage.cfg))
    d, r, g, b = stage.discriminator, stage.classifier, stage.generator, stage.embedders
    frozen = [m for m in (stage.generator1, stage.embedders1, stage.encoder) if m is not None]
    assert frozen and all(not p.requires_grad for m in frozen for p in m.parameters())

    # Generator terms reach G2 and B2 only; D and R run detached for them.
    terms, _ = stage.loss_terms(batch)
    generator_terms = ["rec", "g_dis", "g_cla", "lcode"] + (["match"] if mode == "mse" else [])
    sum(terms[t] for t in generator_terms).backward()
    assert _no_grad(d) and _no_grad(r)
    assert not _no_grad(g) and not _no_grad(b)
    assert all(p.grad is None for m in frozen for p in m.parameters())
    stage.optimizers["main"].zero_grad(set_to_none=True)

    # The adversarial generator term alone: G2 gets a gradient, D none.
    stage.loss_terms(batch)[0]["g_dis"].backward()
    assert _no_grad(d) and not _no_grad(g)
    stage.optimizers["main"].zero_grad(set_to_none=True)

    # D and R terms reach D and R only (fakes are detached for them).
    terms, _ = stage.loss_terms(batch)
    (terms["d_real"] + terms["d_fake"] + terms["r_real"] + terms["r_fake"]).backward()
    assert _no_grad(g) and _no_grad(b)
    assert not _no_grad(d) and not _no_grad(r)
    assert all(p.grad is None for m in frozen for p in m.parameters())


@pytest.mark.parametrize("overrides", [["stage2.unknown_mode=dis"], ["stage2.unknown_mode=mse"],
                                       ["stage2.cla2_adv=false"]], ids=lambda o: o[0])
def test_frozen_networks_stay_fixed(overrides):
    stage, upstream = make(*overrides)
    w1 = upstream["stage1"]["weights"]
    batch = batch_for(stage.cfg)
    r_before = {k: v.clone() for k, v in stage.classifier.state_dict().items()}
    for _ in range(3):
        stage.train_step(batch)
    stage.sample_images(batch, n=2)
    fixed = {"generator": stage.generator1, "embedders": stage.embedders1, "encoder": stage.encoder}
    for name, module in fixed.items():
        if module is None:
            continue
        assert not module.training
        assert all(p.grad is None for p in module.parameters())
        for key, value in module.state_dict().items():
            assert torch.equal(value, w1[name][key]), (name, key)
    # G2 started from G1 and has moved.
    assert not all(torch.equal(v, w1["generator"][k]) for k, v in stage.generator.state_dict().items())
    r_changed = not all(torch.equal(v, r_before[k]) for k, v in stage.classifier.state_dict().items())
    assert r_changed == stage.scfg.cla2_adv


@pytest.mark.parametrize("overrides", [[], ["stage2.use_embedding=false", "stage2.random_ucode=true",
                                            "stage2.unknown_mode=mse"]], ids=["default", "S-mse"])
def test_checkpoint_round_trip(overrides):
    stage, upstream = make(*overrides)
    batch = batch_for(stage.cfg)
    for _ in range(3):
        stage.train_step(batch)
    buffer = io.BytesIO()
    torch.save(stage.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = [stage.train_step(batch) for _ in range(2)]

    torch.manual_seed(123)  # the resumed stage must not depend on the RNG it was built with
    resumed = Stage2(stage.cfg, tiny_factors(stage.cfg), upstream, device="cpu")
    resumed.load_state_dict(state)
    assert resumed.iteration == 3
    got = [resumed.train_step(batch) for _ in range(2)]
    assert got == expected


def test_non_finite_loss_raises():
    stage, _ = make()
    batch = batch_for(stage.cfg)
    stage.train_step(batch)
    batch["image"][0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in stage.models["generator"].state_dict().items()}
    with pytest.raises(NonFiniteLossError) as info:
        stage.train_step(batch)
    err = info.value
    assert err.stage == "stage2" and err.iteration == 1
    after = stage.models["generator"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a bad step reached the weights"
    assert err.term in expected_terms(stage)
    assert "stage2" in str(err) and err.term in str(err)


def test_upstream_is_checked():
    cfg = tiny_config()
    upstream = upstream_for(cfg)
    with pytest.raises(ValueError, match="classifier"):
        Stage2(cfg, tiny_factors(cfg), dict(upstream, classifier=None), device="cpu")
    cfg = tiny_config("stage2.random_ucode=true")
    with pytest.raises(ValueError, match="code_stats"):
        Stage2(cfg, tiny_factors(cfg), dict(upstream_for(cfg), code_stats=None), device="cpu")


def test_weight_average_follows_the_weights_with_its_decay():
    from dsu_models.stages.ema import WeightAverage

    net = torch.nn.Linear(2, 1)
    avg = WeightAverage({"net": net}, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    start = avg.copies["net"].weight.clone()
    avg.update()                    # n = 1: d = min(0.5, 2 / 11) = 2/11
    d = 2 / 11
    torch.testing.assert_close(avg.copies["net"].weight, d * start + (1 - d) * 1.0)
    for _ in range(30):
        avg.update()                # d reaches 0.5: converges to the weights
    torch.testing.assert_close(avg.copies["net"].weight, torch.ones(1, 2), atol=1e-6, rtol=0)
    assert not avg.copies["net"].weight.requires_grad


def test_ema_is_what_stage2_hands_on_and_checkpoints():
    stage, upstream = make("stage2.ema_decay=0.9")
    batch = batch_for(stage.cfg)
    for _ in range(4):
        stage.train_step(batch)
    live = stage.generator.state_dict()
    averaged = stage.models["generator_ema"].state_dict()
    handed = stage.handoff()["weights"]
    assert any(not torch.equal(live[k], averaged[k]) for k in live)
    assert all(torch.equal(handed["generator"][k], averaged[k]) for k in averaged)
    assert all(torch.equal(handed["embedders"][k], v)
               for k, v in stage.models["embedders_ema"].state_dict().items())
    state = stage.state_dict()
    again, _ = make("stage2.ema_decay=0.9", seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(again.models["generator_ema"].state_dict()[k], v) for k, v in averaged.items())
    plain, _ = make()
    assert "generator_ema" not in plain.models  # off: the method's checkpoint and hand-off


def test_dis_lr_sets_the_adversaries_learning_rate():
    stage, _ = make("stage2.dis_lr=0.0003", "stage2.lr_ramp=0")
    stage.set_lrs()
    lrs = {id(p): g["lr"] for g in stage.optimizers["main"].param_groups for p in g["params"]}
    assert lrs[id(next(stage.discriminator.parameters()))] == pytest.approx(3e-4)
    assert lrs[id(next(stage.classifier.parameters()))] == pytest.approx(3e-4)
    assert lrs[id(next(stage.generator.parameters()))] == pytest.approx(stage.scfg.lr)


@pytest.mark.parametrize("mode", ["dis", "mse"])
def test_r1_penalty_value_and_its_gradient(mode):
    stage, _ = make(f"stage2.unknown_mode={mode}", "stage2.r1_weight=2.0")
    d = stage.discriminator.double()
    channels = stage.cfg.image_channels * (2 if mode == "dis" else 1)
    real = torch.rand(4, channels, *batch_for(stage.cfg)["image"].shape[2:], dtype=torch.float64) * 2 - 1
    penalty = stage._r1_penalty(real)
    # the value: D's input gradient on the fast path, squared, summed per image, batch mean
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    assert penalty.item() == pytest.approx(grad.square().flatten(1).sum(1).mean().item(), rel=1e-6)
    # its gradient in D's weights, against central differences along a random direction
    params = [p for p in d.parameters() if p.requires_grad]
    # (a last layer's bias does not move an input gradient: unused, zero)
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    along = sum((gr * v).sum() for gr, v in zip(grads, direction)).item()
    eps = 1e-5
    def shift(step):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(step * v)

    values = []
    for sign in (1, -1):
        shift(sign * eps)
        values.append(stage._r1_penalty(real).item())
        shift(-sign * eps)
    assert along == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-4)


def test_r1_trains_d_only():
    stage, _ = make("stage2.r1_weight=2.0", "stage2.fake_reflect=true")
    batch = stage.to_device(batch_for(stage.cfg))
    terms, _ = stage.loss_terms(batch)
    assert terms["r1"] > 0
    terms["r1"].backward()
    assert not _no_grad(stage.discriminator)
    assert _no_grad(stage.generator) and _no_grad(stage.embedders) and _no_grad(stage.classifier)


@pytest.mark.parametrize("cla2_offset", [True, False])
def test_r_reads_the_real_images_unshifted_unless_cla2_offset(cla2_offset):
    """With random_offset on, D always judges shifted images; R reads the real
    images shifted only with ``cla2_offset`` (a shift moves a labeled position,
    the trap the default recipe turns off)."""
    stage, _ = make("stage2.random_offset=true", f"stage2.cla2_offset={str(cla2_offset).lower()}")
    batch = batch_for(stage.cfg)
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs[0].detach().clone())
        return hook

    stage.classifier.trunk.conv.register_forward_hook(keep("R"))
    stage.discriminator.trunk.conv.register_forward_hook(keep("D"))
    torch.manual_seed(5)
    stage.train_step(batch)
    real = stage.to_device(batch)["image"]
    b, c = real.shape[0], stage.cfg.image_channels
    assert not torch.equal(seen["D"][:b, :c], real)       # D: shifted either way
    assert torch.equal(seen["R"][:b, :c], real) != cla2_offset
