"""The CUDA paths: every stage in each precision with its step as a CUDA graph,
the deferred non-finite check inside a graph, and the single-process runner
end to end (training, distillation, the model bundle, inference) on a GPU.

Skipped without CUDA (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. Needs only ``dsu_models`` (no Ray,
no MLflow).
"""
from __future__ import annotations

import pytest
import torch

from dsu_models.stages.common import NonFiniteLossError
from tiny import tiny_config, tiny_stage_batch, tiny_stages

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STAGES = ("stage1", "classifier", "stage2", "lenc")
CUDA = ["device=cuda", "all_stages.lr_ramp=2"]  # steady (graph-ready) from iteration 2


def _params(stage) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in stage.models.items()
            for k, v in m.named_parameters()}


def _cuda_batches(cfg, name: str, n: int) -> list[dict]:
    return [{k: v.cuda() for k, v in tiny_stage_batch(cfg, name, seed=i).items()} for i in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", STAGES)
def test_every_stage_steps_on_cuda(name, precision):
    """Eager steps, then (fp32, bf16) warm-up, capture and replays of one CUDA
    graph; the replays train (weights move), the losses stay finite and no
    step returns host values (nothing waits for the GPU)."""
    torch.manual_seed(0)
    stage = tiny_stages(tiny_config(*CUDA, f"precision={precision}"), "cuda")[name]
    batches = _cuda_batches(stage.cfg, name, 4)
    for i in range(8):
        assert stage.train_step(batches[i % 4]) is None
    graph = stage._graph
    if precision == "fp16":  # the loss scale's steps stay eager
        assert graph is None
    else:
        assert graph is not None and graph.graph is not None and not graph.failed
    before = _params(stage)
    for i in range(4):
        stage.train_step(batches[i])
    after = _params(stage)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = stage.take_losses()
    assert losses and all(v == v and abs(v) < 1e6 for v in losses.values()), losses


@pytest.mark.parametrize("name, term", [("stage1", "rec"), ("classifier", "total")])
def test_graph_replays_train_like_eager_steps(name, term):
    """On one repeated batch, 40 graph-replayed steps lower the stage's own
    loss as 40 eager steps do (random draws differ, so the two runs agree
    only in trend and size; stage 2's adversarial terms need not fall)."""
    curves = {}
    for graphs in ("false", "true"):
        torch.manual_seed(0)
        stage = tiny_stages(tiny_config(*CUDA, f"cuda_graphs={graphs}"), "cuda")[name]
        batch = _cuda_batches(stage.cfg, name, 1)[0]
        curve = []
        for _ in range(4):
            for _ in range(10):
                stage.train_step(batch)
            curve.append(stage.take_losses()[term])
        curves[graphs] = curve
        assert (stage._graph is not None) == (graphs == "true")
    for graphs, curve in curves.items():
        assert curve[-1] < curve[0], (graphs, curve)
    assert curves["true"][-1] == pytest.approx(curves["false"][-1], rel=0.25, abs=0.1)


def test_non_finite_step_inside_a_graph_is_skipped_and_reported():
    torch.manual_seed(0)
    stage = tiny_stages(tiny_config(*CUDA), "cuda")["stage2"]
    batches = _cuda_batches(stage.cfg, "stage2", 2)
    for i in range(8):
        stage.train_step(batches[i % 2])
    assert stage._graph.graph is not None
    stage.take_losses()
    weights = _params(stage)
    bad = dict(batches[0], image=batches[0]["image"] * float("nan"))
    stage.train_step(bad)                                  # iteration 8, replayed
    assert all(torch.equal(v, _params(stage)[k]) for k, v in weights.items())
    stage.train_step(batches[1])
    with pytest.raises(NonFiniteLossError, match="stage2: loss term .* at iteration 8"):
        stage.take_losses()


def test_runner_end_to_end_on_cuda(tmp_path):
    """The single-process runner on the GPU: all stages (graphs, bf16),
    distillation, the bundle; the model loads on the GPU and swaps like on
    the CPU."""
    from dsu_models.config import load_config
    from dsu_models.inference import DisUnknownModel
    from dsu_models.train import run

    cfg = load_config("tiny", ["num_samples=200", "all_stages.iterations=12", "all_stages.lr_ramp=2",
                                "all_stages.report_interval=4", "all_stages.sample_interval=6",
                                "all_stages.checkpoint_interval=6", "device=cuda", "precision=bf16"])
    lines: list[str] = []
    run(cfg, tmp_path, log=lines.append)
    assert any("[stage2] 12/12" in line for line in lines)
    gpu = DisUnknownModel.load(str(tmp_path / "model"), device="cuda")
    cpu = DisUnknownModel.load(str(tmp_path / "model"), device="cpu")
    images = torch.randint(0, 256, (4, cfg.image_size, cfg.image_size, cfg.image_channels),
                           dtype=torch.uint8).numpy()
    settings = {cfg.labeled_factors[0]: 1}
    diff = (gpu.swap(images, settings).astype(int) - cpu.swap(images, settings).astype(int))
    assert abs(diff).max() <= 2  # float32 inference; cuDNN and the CPU round differently
