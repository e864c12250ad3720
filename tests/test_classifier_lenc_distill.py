"""Fast CPU tests of the classifier pre-training, the labeled encoder and the
distillation of unknown codes (docs/method.md sections 2, 6, 7 end)."""
from __future__ import annotations

import io

import pytest
import torch

from dsu_models import codes, losses
from dsu_models.nn import builders
from dsu_models.config import ConfigError
from dsu_models.data.base import FactorInfo, InMemoryDataset, to_float, to_uint8
from dsu_models.distill import distill, encode_images, load_codes, save_codes
from dsu_models.stages.classifier import ClassifierStage
from dsu_models.stages.common import NonFiniteLossError
from dsu_models.stages.lenc import LencStage
from tests.tiny import tiny_batch, tiny_config, tiny_factors

CPU = torch.device("cpu")


def through_bytes(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def check_resume(make_stage, batch: dict, before: int = 3, after: int = 3):
    """N steps, checkpoint through bytes, a fresh stage loads it: its next losses
    equal an uninterrupted run's."""
    torch.manual_seed(0)
    stage = make_stage()
    for _ in range(before):
        stage.train_step(batch)
    state = through_bytes(stage.state_dict())
    expected = [stage.train_step(batch) for _ in range(after)]
    torch.manual_seed(123)  # a different RNG state, which loading must undo
    resumed = make_stage()
    resumed.load_state_dict(state)
    assert resumed.iteration == before
    got = [resumed.train_step(batch) for _ in range(after)]
    assert got == expected


# ---------------------------------------------------------------- classifier


def classifier_setup(*overrides: str):
    cfg = tiny_config(*overrides)
    return cfg, tiny_factors(cfg)


def test_classifier_learns_fixed_batch():
    cfg, factors = classifier_setup("classifier.random_offset=false", "classifier.lr=3e-3")
    torch.manual_seed(0)
    stage = ClassifierStage(cfg, factors, device=CPU)
    batch = tiny_batch(cfg, 16)
    first = stage.train_step(batch)
    for _ in range(40):
        last = stage.train_step(batch)
    assert last["total"] < 0.5 * first["total"]
    assert last["total"] == pytest.approx(last["nll_floor_hue"] + last["nll_shape"], rel=1e-5)
    accuracy = stage.evaluate(batch["image"], batch["labels"], batch_size=5)
    assert accuracy["acc_floor_hue"] >= 0.9 and accuracy["acc_shape"] >= 0.9
    assert stage.classifier.training  # evaluate restores the mode


@pytest.mark.parametrize("offset", [True, False])
def test_classifier_random_offset_options(offset):
    cfg, factors = classifier_setup(f"classifier.random_offset={str(offset).lower()}")
    stage = ClassifierStage(cfg, factors, device=CPU)
    metrics = stage.train_step(tiny_batch(cfg))
    assert set(metrics) == {"total", "nll_floor_hue", "acc_floor_hue", "nll_shape", "acc_shape"}
    assert all(0.0 <= metrics[f"acc_{n}"] <= 1.0 for n in cfg.labeled_factors)
    assert stage.iteration == 1


def test_classifier_has_fake_outputs_and_handoff():
    cfg, factors = classifier_setup()
    stage = ClassifierStage(cfg, factors, device=CPU)
    logits = stage.classifier(tiny_batch(cfg)["image"])
    assert [lg.shape[1] for lg in logits] == [spec.classes + 1 for _, spec in cfg.labeled()]
    handoff = through_bytes(stage.handoff())
    assert handoff["stage"] == "classifier" and handoff["iteration"] == 0
    r2 = builders.build_image_classifier(cfg, extra_fake=True)
    r2.load_state_dict(handoff["weights"]["classifier"])  # stage 2 takes it as is


def test_classifier_evaluate_uint8_matches_float():
    cfg, factors = classifier_setup()
    stage = ClassifierStage(cfg, factors, device=CPU)
    batch = tiny_batch(cfg, 10)
    images = to_uint8(batch["image"])
    a = stage.evaluate(images, batch["labels"], batch_size=3)
    b = stage.evaluate(to_float(images), batch["labels"], batch_size=10)
    assert a == b


@pytest.mark.parametrize("offset", [True, False])
def test_classifier_checkpoint_round_trip(offset):
    cfg, factors = classifier_setup(f"classifier.random_offset={str(offset).lower()}")
    check_resume(lambda: ClassifierStage(cfg, factors, device=CPU), tiny_batch(cfg))


def test_classifier_nan_raises_and_keeps_weights():
    cfg, factors = classifier_setup()
    stage = ClassifierStage(cfg, factors, device=CPU)
    batch = tiny_batch(cfg)
    batch["image"][0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in stage.classifier.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="classifier"):
        stage.train_step(batch)
    for k, v in stage.classifier.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_classifier_needs_labeled_factors():
    cfg = tiny_config("labeled_factors=[]")
    with pytest.raises(ValueError, match="labeled factors"):
        ClassifierStage(cfg, [], device=CPU)


# ---------------------------------------------------------------- lenc


def fake_code_stats(size: int, n: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(n, size, generator=g) * 0.7
    sigma = torch.nn.functional.softplus(torch.randn(n, size, generator=g))
    return codes.code_statistics(mu, sigma)


def stage2_handoff(cfg, factors) -> dict:
    """Freshly built G2 and B2, the embedders perturbed so classes differ."""
    g = torch.Generator().manual_seed(2)
    generator = builders.build_generator(cfg)
    embedders = builders.build_embedders(cfg, factors)
    with torch.no_grad():
        for emb in embedders:
            emb.mean.add_(torch.randn(emb.mean.shape, generator=g))
            emb.log_std.add_(0.3 * torch.randn(emb.log_std.shape, generator=g))
    return {"stage": "stage2", "config": cfg.to_dict(), "iteration": 7,
            "weights": {"generator": generator.state_dict(), "embedders": embedders.state_dict()}}


def lenc_setup(*overrides: str):
    cfg = tiny_config(*overrides)
    factors = tiny_factors(cfg)
    upstream = {"stage2": through_bytes(stage2_handoff(cfg, factors)),
                "code_stats": fake_code_stats(cfg.unknown_size)}
    return cfg, factors, upstream


def test_lenc_lowers_kl_and_keeps_upstream_frozen():
    cfg, factors, upstream = lenc_setup("lenc.lr=1e-2")
    torch.manual_seed(0)
    stage = LencStage(cfg, factors, upstream, device=CPU)
    frozen = {**{"g." + k: v.clone() for k, v in stage.generator.state_dict().items()},
              **{"b." + k: v.clone() for k, v in stage.embedders.state_dict().items()}}
    batch = tiny_batch(cfg, 16)
    first = stage.train_step(batch)
    for _ in range(40):
        last = stage.train_step(batch)
    assert last["kl_real"] < 0.7 * first["kl_real"]
    assert last["total"] < first["total"]
    assert last["total"] == pytest.approx(0.5 * (last["kl_real"] + last["kl_gen"]), rel=1e-5)
    for module in (stage.generator, stage.embedders):
        assert not module.training
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    now = {**{"g." + k: v for k, v in stage.generator.state_dict().items()},
           **{"b." + k: v for k, v in stage.embedders.state_dict().items()}}
    for k, v in now.items():
        assert torch.equal(v, frozen[k]), k
    assert any(p.grad is not None for p in stage.encoder.parameters())
    accuracy = stage.evaluate(to_uint8(batch["image"]), batch["labels"], batch_size=6)
    assert set(accuracy) == {"acc_floor_hue", "acc_shape"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    handoff = through_bytes(stage.handoff())
    assert handoff["stage"] == "lenc" and handoff["iteration"] == 41
    assert set(handoff["weights"]) == {"label_encoder"}


def test_lenc_generated_half_uses_frozen_g2():
    cfg, factors, upstream = lenc_setup()
    stage = LencStage(cfg, factors, upstream, device=CPU)
    labels = tiny_batch(cfg, 8)["labels"]
    images, targets = stage.generated_batch(labels, torch.float32)
    assert images.shape == (8, cfg.image_channels, cfg.image_size, cfg.image_size)
    assert images.abs().max() <= 1.0 and not images.requires_grad
    assert [m.shape for m, _ in targets] == [(8, spec.size) for _, spec in cfg.labeled()]


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_lenc_generated_weight(weight):
    """``lenc.generated_weight`` sets the generated half's share of the loss; at 0
    the step trains S on the real batch alone and never runs G2."""
    cfg, factors, upstream = lenc_setup(f"lenc.generated_weight={weight}")
    torch.manual_seed(0)
    stage = LencStage(cfg, factors, upstream, device=CPU)
    batch = tiny_batch(cfg, 8)
    calls = []
    stage.generator.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        direct = losses.labeled_encoder_loss(stage.targets(batch["labels"]), stage.encoder(batch["image"]))
    metrics = stage.train_step(batch)
    if weight == 0.0:
        assert not calls and set(metrics) == {"total", "kl_real"}
        assert metrics["total"] == pytest.approx(float(direct), rel=1e-5)
    else:
        assert calls
        assert metrics["kl_real"] == pytest.approx(float(direct), rel=1e-5)
        assert metrics["total"] == pytest.approx(0.75 * metrics["kl_real"] + 0.25 * metrics["kl_gen"],
                                                 rel=1e-5)


@pytest.mark.parametrize("weight", ["1.0", "-0.1"])
def test_lenc_generated_weight_range(weight):
    with pytest.raises(ConfigError, match=rf"lenc.generated_weight: {weight}"):
        tiny_config(f"lenc.generated_weight={weight}")


def test_lenc_sample_images_leave_global_rng_alone():
    cfg, factors, upstream = lenc_setup()
    stage = LencStage(cfg, factors, upstream, device=CPU)
    state = torch.get_rng_state()
    grids = stage.sample_images(tiny_batch(cfg), n=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert grids["labels_read"].dtype == torch.uint8 and grids["labels_read"].dim() == 3
    assert stage.encoder.training


def test_lenc_checkpoint_round_trip():
    cfg, factors, upstream = lenc_setup()
    check_resume(lambda: LencStage(cfg, factors, upstream, device=CPU), tiny_batch(cfg))


def test_lenc_all_labeled():
    cfg, factors, upstream = lenc_setup("unknown_size=0")
    stage = LencStage(cfg, factors, upstream, device=CPU)
    assert upstream["code_stats"]["mean"].shape == (0,)
    metrics = stage.train_step(tiny_batch(cfg))
    assert metrics["kl_gen"] > 0


def test_lenc_refuses_without_labels_or_embeddings():
    cfg = tiny_config("labeled_factors=[]")
    with pytest.raises(ValueError, match="labeled factors"):
        LencStage(cfg, [], {}, device=CPU)
    cfg, factors, upstream = lenc_setup("stage2.use_embedding=false")
    with pytest.raises(ValueError, match="use_embedding"):
        LencStage(cfg, factors, upstream, device=CPU)


def test_lenc_checks_code_stats_size():
    cfg, factors, upstream = lenc_setup()
    upstream["code_stats"] = fake_code_stats(cfg.unknown_size + 1)
    with pytest.raises(ValueError, match="unknown_size"):
        LencStage(cfg, factors, upstream, device=CPU)


# ---------------------------------------------------------------- distill


def tiny_splits(cfg, n_train: int = 23, n_test: int = 9) -> dict[str, InMemoryDataset]:
    factors = [FactorInfo("f", 3)]
    out = {}
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, cfg.image_channels, cfg.image_size, cfg.image_size),
                               generator=g, dtype=torch.uint8)
        out[name] = InMemoryDataset(images, torch.randint(0, 3, (n, 1), generator=g), factors,
                                    ids=torch.arange(n) * 10 + seed, name=name)
    return out


def random_encoder(cfg):
    torch.manual_seed(3)
    # zero_init=False so the codes vary between images
    return builders.build_encoder(cfg, [cfg.unknown_size], zero_init=False)


def test_distill_codes_match_direct_encoder_call():
    cfg = tiny_config()
    encoder = random_encoder(cfg)
    splits = tiny_splits(cfg)
    result = distill(encoder, splits, batch_size=5, device=CPU)
    assert encoder.training  # mode restored
    encoder.eval()
    with torch.no_grad():
        for name, data in splits.items():
            ((mu, sigma),) = encoder(to_float(data.images))
            got = result["codes"][name]
            assert got["mu"].dtype == torch.float32 and got["sigma"].dtype == torch.float32
            assert torch.allclose(got["mu"], mu, atol=1e-5)
            assert torch.allclose(got["sigma"], sigma, atol=1e-5)
            assert torch.equal(got["ids"], data.ids)
    # an iterable of float batches gives the same codes
    batches = [to_float(b) for b in splits["test"].images.split(4)]
    mu, sigma = encode_images(encoder, batches, 4, CPU)
    assert torch.allclose(mu, result["codes"]["test"]["mu"], atol=1e-6)


def test_ray_distill_actor_reads_uint8_rows_like_the_runner():
    """The Ray Data actor of pipelines/jobs/distill_actors.py gets Decode's uint8 rows and must
    give the codes the single-process distillation gives."""
    import numpy as np

    from pipelines.jobs.distill_actors import EncodeUnknown

    cfg = tiny_config()
    encoder = random_encoder(cfg)
    splits = tiny_splits(cfg)
    data = splits["test"]
    actor = EncodeUnknown(cfg.to_dict(), encoder.state_dict(), use_gpu=False)
    table = actor({"id": data.ids.numpy(), "image": data.images.numpy()})
    mu = torch.from_numpy(np.stack(table.column("mu").to_pylist())).float()
    expected = distill(encoder, splits, batch_size=4, device=CPU)["codes"]["test"]
    assert table.column("id").to_pylist() == data.ids.tolist()
    assert torch.allclose(mu, expected["mu"], atol=1e-5)


def test_code_stats_from_parquet_equal_all_at_once(tmp_path):
    """The statistics the Ray distillation computes from its Parquet codes
    (read in batches, without a read-only-array warning) equal code_statistics."""
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.jobs.distill_actors import code_stats_from_parquet

    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(50, 3, generator=g), torch.rand(50, 3, generator=g) + 0.1
    for part, rows in enumerate((slice(0, 20), slice(20, 50))):
        column = lambda t: pa.FixedSizeListArray.from_arrays(pa.array(t[rows].numpy().ravel()), 3)  # noqa: E731
        pq.write_table(pa.table({"mu": column(mu), "sigma": column(sigma)}), tmp_path / f"p{part}.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = code_stats_from_parquet(tmp_path, 3)
    expected = codes.code_statistics(mu, sigma)
    for key in ("mean", "std", "variance_ratio"):
        assert torch.allclose(got[key].double(), expected[key].double(), atol=1e-6), key


def test_distill_stats_equal_all_at_once():
    cfg = tiny_config()
    result = distill(random_encoder(cfg), tiny_splits(cfg), batch_size=4, device=CPU)
    train = result["codes"]["train"]
    expected = codes.code_statistics(train["mu"], train["sigma"])
    got = result["stats"]
    for key in ("mean", "std", "variance_ratio", "eigenvalues"):
        assert got[key].dtype == torch.float64
        assert torch.allclose(got[key], expected[key], rtol=1e-9, atol=1e-12), key

    def rebuilt(s):  # eigenvectors are defined up to sign: compare V diag(l) V^T
        return s["eigenvectors"] @ torch.diag(s["eigenvalues"]) @ s["eigenvectors"].T

    assert torch.allclose(rebuilt(got), rebuilt(expected), atol=1e-10)


def test_save_load_codes_round_trip(tmp_path):
    cfg = tiny_config()
    result = distill(random_encoder(cfg), tiny_splits(cfg), batch_size=8, device=CPU)
    path = save_codes(result, tmp_path / "sub" / "codes.pt")
    assert [p.name for p in path.parent.iterdir()] == ["codes.pt"]  # no temp file left
    loaded = load_codes(path)
    for split, parts in result["codes"].items():
        for key, value in parts.items():
            assert torch.equal(loaded["codes"][split][key], value)
    for key, value in result["stats"].items():
        assert torch.equal(loaded["stats"][key], value)


@pytest.mark.parametrize("encoder_kind", ["none", "size0"])
def test_distill_unknown_size_zero(tmp_path, encoder_kind):
    cfg = tiny_config("unknown_size=0")
    encoder = None if encoder_kind == "none" else builders.build_encoder(cfg, [0], zero_init=True)
    splits = tiny_splits(cfg)
    result = distill(encoder, splits, batch_size=4, device=CPU)
    for name, data in splits.items():
        assert result["codes"][name]["mu"].shape == (len(data), 0)
        assert result["codes"][name]["sigma"].shape == (len(data), 0)
    assert result["stats"]["mean"].shape == (0,)
    assert result["stats"]["eigenvectors"].shape == (0, 0)
    loaded = load_codes(save_codes(result, tmp_path / "codes.pt"))
    assert loaded["codes"]["train"]["mu"].shape == (len(splits["train"]), 0)


def test_distill_needs_train_split():
    cfg = tiny_config()
    splits = tiny_splits(cfg)
    with pytest.raises(ValueError, match="train"):
        distill(random_encoder(cfg), {"test": splits["test"]}, batch_size=4, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stages_and_distill_run_on_cuda():
    cuda = torch.device("cuda")
    cfg, factors, upstream = lenc_setup()
    batch = tiny_batch(cfg)
    classifier = ClassifierStage(cfg, factors, device=cuda)
    classifier.train_step(batch)
    assert classifier.take_losses()["total"] > 0
    assert set(classifier.evaluate(to_uint8(batch["image"]), batch["labels"])) == {"acc_floor_hue", "acc_shape"}
    lenc = LencStage(cfg, factors, upstream, device=cuda)
    lenc.train_step(batch)
    assert lenc.take_losses()["total"] > 0
    lenc.evaluate(batch["image"], batch["labels"])
    encoder = random_encoder(cfg).to(cuda)
    result = distill(encoder, tiny_splits(cfg), batch_size=4, device=cuda)
    assert result["codes"]["train"]["mu"].device.type == "cpu"
    assert result["stats"]["mean"].device.type == "cpu"
