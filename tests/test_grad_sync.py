"""Data-parallel equivalence of the pipeline's gradient synchronisation.

Two gloo processes, each on half of a global batch, synchronised by
``pipelines.cluster.collective.allreduce_gradients`` (one all-reduce per iteration),
must make the same parameter update as one process on the whole batch.
Batch-statistic losses are off (they are not decomposable over shards) and
sampling noise is made deterministic, so the comparison is exact up to float
rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from servers import free_port



CASES = {
    "classifier": ["classifier.random_offset=false"],
    "stage1": ["stage1.cla1_mode=code", "stage1.ubatch_weight=0", "stage1.lbatch_weight=0",
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


def _worker(rank: int, world: int, port: int, case: str, out: str):
    from pipelines.cluster.collective import allreduce_gradients, broadcast_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stage, batch = _build(case)
        broadcast_state(stage)
        stage.grad_sync = allreduce_gradients
        half = batch["image"].shape[0] // world
        shard = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
        for _ in range(2):
            stage.train_step(shard)
        if rank == 0:
            torch.save(_params(stage), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_match_one(case, tmp_path):
    torch.set_num_threads(1)
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
