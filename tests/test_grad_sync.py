"""Data-parallel equivalence of the pipeline's gradient synchronisation.

Two gloo processes, each on half of a global batch, synchronised by
``pipelines.cluster.collective.allreduce_gradients`` (one all-reduce per iteration),
must make the same parameter update as one process on the whole batch.
Sampling noise is made deterministic, so the comparison is exact up to float
rounding. With the batch-statistic losses on, the workers reduce the batch
statistics with gradients (``sum_over_workers``) and must still match one
process; a non-finite loss on one worker stops both in the same iteration.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from servers import free_port



CASES = {
    "classifier": ["classifier.random_offset=false"],
    "stage1": ["stage1.cla1_mode=code", "stage1.ubatch_weight=0", "stage1.lbatch_weight=0",
               "nested_dropout=false", "stage1.lr_ramp=0"],
    "stage1-batch": ["stage1.cla1_mode=code", "stage1.ubatch_weight=1", "stage1.lbatch_weight=1",
                     "nested_dropout=false", "stage1.lr_ramp=0"],
}


def _build(case: str):
    from dsu_models import codes
    from dsu_models.stages.classifier import ClassifierStage
    from dsu_models.stages.stage1 import Stage1
    from tiny import tiny_batch, tiny_config, tiny_factors

    # Deterministic sampling: the stratified noise of a shard differs from the
    # whole batch's, which is not what this test is about.
    codes.stratified_normal = lambda batch, dim, generator=None, device=None, dtype=None: \
        torch.zeros(batch, dim, device=device, dtype=dtype or torch.float32)
    cfg = tiny_config(*CASES[case], "all_stages.batch_size=8")
    torch.manual_seed(0)
    stage = (ClassifierStage if case == "classifier" else Stage1)(cfg, tiny_factors(cfg))
    return stage, tiny_batch(cfg, batch=8, seed=1)


def _params(stage) -> dict:
    return {f"{m}.{n}": p.detach().clone() for m, mod in stage.models.items()
            for n, p in mod.named_parameters()}


@contextlib.contextmanager
def _synced_stage(rank: int, world: int, port: int, case: str, batch_statistics: bool = False):
    """In a gloo process group: ``(stage, this rank's shard of the batch)``, the
    stage synchronised as the Train worker does (gradients and losses averaged;
    with ``batch_statistics`` the batch losses reduced too) when ``world > 1``."""
    from pipelines.cluster.collective import allreduce_gradients, broadcast_state, sum_over_workers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stage, batch = _build(case)
        broadcast_state(stage)
        if world > 1:
            stage.grad_sync = allreduce_gradients
            if batch_statistics:
                stage.batch_reduce = sum_over_workers
        half = batch["image"].shape[0] // world
        yield stage, {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
        dist.barrier()   # both ranks done before either tears its connections down
    finally:
        dist.destroy_process_group()


def _exits_at_once(fn):
    """A spawned worker that leaves with ``os._exit`` once it has returned (its
    results saved). Left to the interpreter's own teardown, about one run in six
    aborted inside gloo ("terminate called without an active exception") after
    every result was already written."""
    @functools.wraps(fn)
    def run(*args):
        fn(*args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return run


@_exits_at_once
def _worker(rank: int, world: int, port: int, case: str, out: str):
    with _synced_stage(rank, world, port, case) as (stage, shard):
        for _ in range(2):
            stage.train_step(shard)
        if rank == 0:
            torch.save(_params(stage), out)


@pytest.mark.parametrize("case", ["classifier", "stage1"])
def test_two_workers_match_one(case, tmp_path, monkeypatch):
    from dsu_models import codes

    torch.set_num_threads(1)
    monkeypatch.setattr(codes, "stratified_normal", codes.stratified_normal)  # _build replaces it
    stage, batch = _build(case)
    before = _params(stage)
    for _ in range(2):
        stage.train_step(batch)
    single = _params(stage)

    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, free_port(), case, out), nprocs=2, join=True,
                       start_method="spawn")
    double = torch.load(out, weights_only=True)
    moved = [k for k in single if not torch.equal(single[k], before[k])]
    assert moved, "the step changed nothing: the comparison would be empty"
    for key in single:
        assert torch.allclose(single[key], double[key], atol=1e-6, rtol=1e-4), key


@_exits_at_once
def _batch_worker(rank: int, world: int, port: int, out: str):
    """Stage 1 with its batch-statistic losses on, synchronised as the Train worker does."""
    with _synced_stage(rank, world, port, "stage1-batch", batch_statistics=True) as (stage, shard):
        losses = [stage.train_step(shard) for _ in range(2)]
        if rank == 0:
            torch.save({"params": _params(stage), "losses": [[l[k] for k in sorted(l)] for l in losses]}, out)


def test_batch_statistic_losses_over_two_workers_match_one(tmp_path):
    """With the batch KL terms on (weight 1), two workers on half batches make
    the same update as one worker on the whole batch: the losses are computed
    over the global batch with gradients through the reduction."""
    results = {}
    for world in (1, 2):
        out = str(tmp_path / f"world{world}.pt")
        mp.start_processes(_batch_worker, args=(world, free_port(), out), nprocs=world, join=True,
                           start_method="spawn")
        results[world] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    for key in one["params"]:
        assert torch.allclose(one["params"][key], two["params"][key], atol=1e-6, rtol=1e-4), key
    assert torch.allclose(torch.tensor(one["losses"]), torch.tensor(two["losses"]), rtol=1e-4, atol=1e-6)
    # without the reduction the halves' statistics differ from the whole batch's
    from dsu_models import codes
    mu = torch.randn(8, 3) * torch.arange(1, 9).unsqueeze(1)
    sigma = torch.rand(8, 3) + 0.1
    whole = codes.batch_loss(mu, sigma, None)
    halves = (codes.batch_loss(mu[:4], sigma[:4], None) + codes.batch_loss(mu[4:], sigma[4:], None)) / 2
    assert not torch.allclose(whole, halves, rtol=1e-3)
    assert torch.allclose(codes.batch_loss(mu, sigma, None, reduce=lambda t: t), whole, rtol=1e-5)


@_exits_at_once
def _nan_worker(rank: int, world: int, port: int, out: str):
    from dsu_models.stages.common import NonFiniteLossError

    with _synced_stage(rank, world, port, "stage1-batch", batch_statistics=True) as (stage, shard):
        stage.train_step(shard)
        if rank == 1:  # only this rank's data goes bad
            shard["image"] = torch.full_like(shard["image"], float("nan"))
        try:
            stage.train_step(shard)
            outcome = "went on"
        except NonFiniteLossError as exc:
            outcome = f"stopped at {exc.iteration}"
        torch.save({"outcome": outcome}, f"{out}.{rank}")


def test_a_non_finite_loss_on_one_worker_stops_every_worker_in_that_iteration(tmp_path):
    out = str(tmp_path / "nan")
    mp.start_processes(_nan_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    outcomes = [torch.load(f"{out}.{r}", weights_only=True)["outcome"] for r in (0, 1)]
    assert outcomes == ["stopped at 1", "stopped at 1"]
