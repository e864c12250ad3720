"""Precision options and the GPU's way of stepping, exercised on the CPU.

bf16 and fp16 autocast run on a CPU too, and the deferred non-finite check
(what a CUDA stage does instead of reading every loss at once) is a switch
that a CPU stage can take, so everything here but the CUDA graph itself is
tested without a GPU; tests/test_cuda.py covers the rest on a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from dsu_models.config import ConfigError
from dsu_models.loop import Cadence, Sink, run_stage
from dsu_models.precision import LossScale
from dsu_models.stages.common import NonFiniteLossError
from tiny import tiny_config, tiny_stage_batch, tiny_stages

pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = ("stage1", "classifier", "stage2", "lenc")


def _params(stage) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in stage.models.items()
            for k, v in m.named_parameters()}


def _changed(before: dict, stage) -> bool:
    after = _params(stage)
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", STAGES)
def test_autocast_steps_track_fp32(name, precision):
    """A few steps under autocast: finite, the weights move and stay float32,
    the heads' outputs are float32, and each loss stays near the same steps'
    float32 loss (same seed, same batches)."""
    runs = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        stage = tiny_stages(tiny_config(f"precision={p}"))[name]
        before = _params(stage)
        runs[p] = [stage.train_step(tiny_stage_batch(stage.cfg, name, seed=i)) for i in range(3)]
        assert _changed(before, stage)
        assert all(v.dtype == torch.float32 for v in _params(stage).values())
    low = stage
    assert low.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for ref, got in zip(runs["fp32"], runs[precision]):
        assert ref.keys() == got.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=0.1, abs=0.05), key


def test_autocast_runs_convolutions_low_and_heads_float32():
    stage = tiny_stages(tiny_config("precision=bf16"))["stage1"]
    seen = {}
    conv = stage.encoder.trunk.conv[0]
    def record(key):
        def hook(module, inputs, output):
            seen.setdefault(key, output.dtype)  # returns None: the output is kept
        return hook

    conv.register_forward_hook(record("conv"))
    stage.encoder.heads.register_forward_hook(record("head"))
    stage.train_step(tiny_stage_batch(stage.cfg, "stage1"))
    assert seen == {"conv": torch.bfloat16, "head": torch.float32}


def test_loss_scale_skips_overflowing_steps_and_adapts():
    """fp16: a scale so large the gradients overflow skips the step (weights and
    Adam state unchanged) and halves the scale; clean steps then move the weights."""
    stage = tiny_stages(tiny_config("precision=fp16"))["classifier"]
    assert isinstance(stage.loss_scale, LossScale)
    stage.loss_scale.scale.fill_(3e38)
    before = _params(stage)
    stage.train_step(tiny_stage_batch(stage.cfg, "classifier"))
    assert not _changed(before, stage)
    assert stage.loss_scale.scale.item() == pytest.approx(1.5e38)
    stage.loss_scale.scale.fill_(1024.0)
    stage.train_step(tiny_stage_batch(stage.cfg, "classifier", seed=1))
    assert _changed(before, stage)
    state = stage.state_dict()
    assert state["loss_scale"]["scale"].item() == 1024.0
    other = tiny_stages(tiny_config("precision=fp16"))["classifier"]
    other.load_state_dict(state)
    assert other.loss_scale.scale.item() == 1024.0


def _deferred(name: str):
    torch.manual_seed(0)
    stage = tiny_stages(tiny_config())[name]
    stage.deferred_checks = True  # what a CUDA stage does
    return stage


@pytest.mark.parametrize("name", STAGES)
def test_deferred_losses_equal_immediate(name):
    """Summed on the device and read once per report, the means are the
    immediate per-step values' means."""
    torch.manual_seed(0)
    eager = tiny_stages(tiny_config())[name]
    values = [eager.train_step(tiny_stage_batch(eager.cfg, name, seed=i)) for i in range(3)]
    deferred = _deferred(name)
    assert all(deferred.train_step(tiny_stage_batch(deferred.cfg, name, seed=i)) is None
               for i in range(3))
    means = deferred.take_losses()
    assert means.keys() == values[0].keys()
    for key in means:
        assert means[key] == pytest.approx(sum(v[key] for v in values) / 3, rel=1e-5, abs=1e-6)
    assert deferred.take_losses() == {}  # nothing since the last report


@pytest.mark.parametrize("name", STAGES)
def test_deferred_non_finite_step_changes_nothing_and_raises_at_report(name):
    stage = _deferred(name)
    cfg = stage.cfg
    stage.train_step(tiny_stage_batch(cfg, name))
    stage.take_losses()
    weights = _params(stage)
    adam_steps = [s["step"].clone() for o in stage.optimizers.values() for s in o.state.values()]
    bad = tiny_stage_batch(cfg, name, seed=1)
    bad["image"] = bad["image"] * float("nan")
    stage.train_step(bad)                                    # iteration 1: skipped on the device
    assert not _changed(weights, stage)
    assert [s["step"] for o in stage.optimizers.values() for s in o.state.values()] == adam_steps
    stage.train_step(tiny_stage_batch(cfg, name, seed=2))    # iteration 2: a good step trains
    assert _changed(weights, stage)
    with pytest.raises(NonFiniteLossError, match=f"{name}: loss term .* at iteration 1"):
        stage.take_losses()


class _Recorder(Sink):
    def __init__(self):
        self.saved: list[int] = []

    def report(self, stage, losses, images_per_s, checkpoint):
        if checkpoint:
            self.saved.append(stage.iteration)


def test_loop_raises_deferred_non_finite_before_the_checkpoint():
    stage = _deferred("classifier")
    sink = _Recorder()

    def batches(it):
        batch = tiny_stage_batch(stage.cfg, "classifier", seed=it)
        if it == 5:
            batch["image"] = batch["image"] * float("nan")
        return batch

    with pytest.raises(NonFiniteLossError, match="iteration 5"):
        run_stage(stage, batches, sink, Cadence(report_every=2, checkpoint_every=4))
    assert sink.saved == [4]  # iteration 8's checkpoint, after the bad step, was never written


def test_channels_last_computes_the_same_step():
    """Layout only: channels-last networks and images give the NCHW step's losses."""
    out = {}
    for flag in ("false", "true"):
        torch.manual_seed(0)
        stage = tiny_stages(tiny_config(f"channels_last={flag}"))["stage2"]
        out[flag] = stage.train_step(tiny_stage_batch(stage.cfg, "stage2"))
    conv = stage.discriminator.trunk.conv[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for key, value in out["false"].items():
        assert out["true"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_uint8_images_are_converted_on_the_device():
    torch.manual_seed(0)
    stage = tiny_stages(tiny_config())["classifier"]
    batch = tiny_stage_batch(stage.cfg, "classifier")
    raw = ((batch["image"] + 1) * 127.5).round().to(torch.uint8)
    moved = stage.to_device({"image": raw, "labels": batch["labels"]})
    assert moved["image"].dtype == torch.float32
    torch.testing.assert_close(moved["image"], batch["image"], atol=1 / 127.5, rtol=0)


@pytest.mark.parametrize("override, message", [
    ("precision=fp8", "precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("cuda_graphs=true", "cuda_graphs: true needs a CUDA device"),
])
def test_bad_precision_settings_are_refused(override, message):
    extra = ["device=cpu"] if override.startswith("cuda_graphs") else []
    with pytest.raises(ConfigError, match=message):
        tiny_config(override, *extra)
