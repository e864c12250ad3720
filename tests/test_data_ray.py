"""Ray Data paths: the Ray preparation job writes what the plain one writes, and
two Ray Train workers get disjoint shards that together cover the split."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsu_models.data import prepare, read_manifest, read_split

pytestmark = pytest.mark.slow


def test_ray_prepare_matches_plain(ray_session, tmp_path):
    from pipelines.prepare_data import prepare_with_ray

    opts = dict(num_samples=400, image_size=16, chunk_size=100)
    a = prepare_with_ray("shapes3d", tmp_path / "ray", **opts)
    b = prepare("shapes3d", tmp_path / "plain", **opts)
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["content_hash"] == mb["content_hash"] and ma["factors"] == mb["factors"]
    assert ma["splits"] == mb["splits"]
    for split in ("train", "test", "plot"):
        x, y = read_split(a, split), read_split(b, split)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert prepare_with_ray("shapes3d", tmp_path / "ray", **opts) == a     # reused


def test_train_dataset_columns(ray_session, tmp_path):
    from pipelines.data_loading import train_dataset

    out = prepare("sprites", tmp_path / "p", num_samples=100, image_size=16)
    ds = train_dataset(out, image_size=8)
    row = ds.take(1)[0]
    assert row["image"].shape == (1, 8, 8) and row["image"].dtype == np.float32
    assert -1.0 <= row["image"].min() and row["image"].max() <= 1.0
    assert row["labels"].shape == (5,) and row["labels"].dtype == np.int64


def test_two_workers_get_disjoint_covering_shards(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.data_loading import train_dataset

    # defined here so cloudpickle ships it by value (workers cannot import test modules)
    def worker(config):
        import ray.train

        from pipelines.data_loading import iter_epochs

        shard = ray.train.get_dataset_shard("train")
        seen = {0: [], 1: []}
        for epoch, batch in iter_epochs(shard, batch_size=16, epochs=2, drop_last=False,
                                        shuffle_buffer=32, seed=ray.train.get_context().get_world_rank()):
            assert batch["image"].shape[1:] == (1, 16, 16) and batch["image"].dtype == torch.float32
            seen[epoch] += batch["id"].tolist()
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json.dump(seen, f)
        ray.train.report({"rows": len(seen[0])})

    out = prepare("sprites", tmp_path / "p", num_samples=200, image_size=16, chunk_size=50)
    ids = set(read_split(out, "train").ids.tolist())
    assert len(ids) == 180
    trainer = TorchTrainer(
        worker, train_loop_config={"out": str(tmp_path)},
        # fractional CPUs leave room for Ray Data on a 2-CPU node (RAY_NOTES.md)
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shards"),
        datasets={"train": train_dataset(out)})
    trainer.fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(set(a)) and len(b) == len(set(b))
        assert set(a).isdisjoint(b)
        assert set(a) | set(b) == ids
