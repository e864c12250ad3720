"""Ray Data paths: the Ray preparation job writes what the plain one writes, and
two Ray Train workers get disjoint shards that together cover the split."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from dsu_models.data import prepare, read_manifest, read_split



class FakeShard:
    """Stands in for a Ray Data shard: rows 0..n-1 in order, image and label made
    from the id so a test can see that rows stay whole; counts the passes."""

    def __init__(self, n: int):
        self.n, self.passes = n, 0

    def iter_batches(self, batch_size, drop_last, batch_format, **shuffle):
        self.passes += 1
        end = self.n - self.n % batch_size if drop_last else self.n
        for start in range(0, end, batch_size):
            ids = np.arange(start, min(start + batch_size, end))
            yield {"id": ids, "image": np.broadcast_to(ids.astype(np.uint8).reshape(-1, 1, 1, 1),
                                                       (len(ids), 1, 2, 2)).copy(),
                   "labels": (ids % 3).reshape(-1, 1)}


@pytest.mark.parametrize("drop_last", [True, False])
def test_cached_epochs_read_the_shard_once(drop_last):
    from pipelines.data.loading import iter_epochs

    shard, seen = FakeShard(70), {}
    for epoch, batch in iter_epochs(shard, 16, epochs=4, seed=3, drop_last=drop_last, cache=True):
        assert batch["image"].dtype == torch.float32    # cached as uint8, served in [-1, 1]
        assert torch.allclose((batch["image"][:, 0, 1, 1] + 1) * 127.5, batch["id"].float(), atol=1e-4)
        assert torch.equal(batch["labels"][:, 0], batch["id"] % 3)
        assert len(batch["id"]) == 16 or not drop_last
        seen.setdefault(epoch, []).append(batch["id"])
    assert shard.passes == 1
    epochs = [torch.cat(seen[e]).tolist() for e in range(4)]
    for e, ids in enumerate(epochs):
        assert len(ids) == len(set(ids)) == (64 if drop_last else 70)
    assert epochs[1] != epochs[2] != epochs[3]                     # reshuffled every epoch
    if drop_last:   # the partial batch of the first pass is kept for later epochs
        assert set(epochs[1] + epochs[2] + epochs[3]) - set(epochs[0]) == set(range(64, 70))


def test_uncached_epochs_reread_the_shard():
    from pipelines.data.loading import iter_epochs

    shard = FakeShard(40)
    batches = list(iter_epochs(shard, 16, epochs=3, shuffle_buffer=0))
    assert len(batches) == 6 and shard.passes == 3
    for _, batch in batches:
        assert torch.allclose((batch["image"][:, 0, 0, 0] + 1) * 127.5, batch["id"].float(), atol=1e-4)


@pytest.mark.parametrize("cache", [False, True])
def test_raw_epochs_leave_images_uint8_for_the_gpu(cache):
    """What a GPU worker asks for: the stage converts on the device."""
    from pipelines.data.loading import iter_epochs

    for _, batch in iter_epochs(FakeShard(40), 16, epochs=2, shuffle_buffer=0, cache=cache, raw=True):
        assert batch["image"].dtype == torch.uint8
        assert torch.equal(batch["image"][:, 0, 0, 0].long(), batch["id"])


def test_shard_fits_in_memory():
    from pipelines.data.loading import shard_fits_in_memory

    manifest = {"channels": 3, "factors": [{}] * 5,
                "splits": {"train": {"rows": 1000}, "val": {"rows": 100}}}
    row = 3 * 32 * 32 + 8 * 6      # uint8 pixels, int64 id and labels
    assert shard_fits_in_memory(manifest, "train", 32, 2, 500 * row / 2 ** 20)
    assert not shard_fits_in_memory(manifest, "train", 32, 2, 499 * row / 2 ** 20)
    assert not shard_fits_in_memory(manifest, "train", 32, 1, 999 * row / 2 ** 20)
    assert not shard_fits_in_memory(manifest, "train", 32, 2, 0)


@pytest.mark.slow
def test_ray_prepare_matches_plain(ray_session, tmp_path):
    from pipelines.jobs.prepare import prepare_with_ray

    opts = dict(num_samples=400, image_size=16, chunk_size=100)
    a = prepare_with_ray("shapes3d", tmp_path / "ray", **opts)
    b = prepare("shapes3d", tmp_path / "plain", **opts)
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["content_hash"] == mb["content_hash"] and ma["factors"] == mb["factors"]
    assert ma["splits"] == mb["splits"]
    for split in ("train", "val", "test", "plot"):
        x, y = read_split(a, split), read_split(b, split)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert prepare_with_ray("shapes3d", tmp_path / "ray", **opts) == a     # reused


def _torch_in_decode_workers(directory) -> dict[int, bool]:
    """{pid: torch imported} of the worker processes that run the training
    reader's decode step on ``directory`` (a probe after Decode)."""
    from pipelines.data.loading import train_dataset

    def probe(batch):
        import sys as _sys
        n = len(batch["id"])
        return {"pid": np.full(n, os.getpid()), "torch": np.full(n, "torch" in _sys.modules)}

    rows = train_dataset(directory).map_batches(probe, batch_format="numpy").take_all()
    return {int(r["pid"]): bool(r["torch"]) for r in rows}


@pytest.mark.slow
def test_preparation_leaves_no_torch_in_the_decode_workers(ray_session, tmp_path):
    """Preparation renders with torch (0.3 GiB per process); the torch-free decode
    tasks that stream to training must not run in its processes afterwards."""
    from pipelines.jobs.prepare import prepare_with_ray

    first = prepare("sprites", tmp_path / "plain", num_samples=200, image_size=16)
    before = _torch_in_decode_workers(first)      # workers other tests left behind
    out = prepare_with_ray("sprites", tmp_path / "p", num_samples=400, image_size=16, chunk_size=50)
    after = _torch_in_decode_workers(out)
    assert [pid for pid, has in after.items() if has and not before.get(pid)] == []


@pytest.mark.slow
def test_train_dataset_columns(ray_session, tmp_path):
    from pipelines.data.loading import train_dataset

    out = prepare("sprites", tmp_path / "p", num_samples=100, image_size=16)
    ds = train_dataset(out, image_size=8)
    row = ds.take(1)[0]
    # uint8 through the object store; iter_epochs maps it to [-1, 1]
    assert row["image"].shape == (1, 8, 8) and row["image"].dtype == np.uint8
    assert row["image"].max() > row["image"].min()
    # at the prepared size the pixels are exactly the plain reader's
    plain = read_split(out, "train")
    by_id = {int(i): k for k, i in enumerate(plain.ids)}
    for row in train_dataset(out).take(5):
        assert np.array_equal(row["image"], plain.images[by_id[int(row["id"])]].numpy())
    assert row["labels"].shape == (5,) and row["labels"].dtype == np.int64


def test_cluster_cache_materializes_a_split_that_fits(ray_session, tmp_path):
    from ray.data.dataset import MaterializedDataset

    from pipelines.data.loading import cluster_cached, decoded_mb, train_dataset

    out = prepare("sprites", tmp_path / "p", num_samples=100, image_size=16)
    manifest = read_manifest(out)
    size = decoded_mb(manifest, "train", 16)
    assert 0 < size < 1
    streamed = train_dataset(out)
    assert cluster_cached(streamed, manifest, "train", 16, 0) is streamed          # off
    assert cluster_cached(streamed, manifest, "train", 16, size / 2) is streamed   # does not fit
    cached = cluster_cached(train_dataset(out), manifest, "train", 16, 1)
    assert isinstance(cached, MaterializedDataset)
    plain = read_split(out, "train")
    by_id = {int(i): k for k, i in enumerate(plain.ids)}
    rows = cached.take_all()
    assert sorted(int(r["id"]) for r in rows) == sorted(by_id)
    for row in rows[:5]:
        assert np.array_equal(row["image"], plain.images[by_id[int(row["id"])]].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_two_workers_get_disjoint_covering_shards(ray_session, tmp_path, cache):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.data.loading import train_dataset

    # defined here so cloudpickle ships it by value (workers cannot import test modules)
    def worker(config):
        import ray.train

        from pipelines.data.loading import iter_epochs

        shard = ray.train.get_dataset_shard("train")
        seen = {0: [], 1: []}
        for epoch, batch in iter_epochs(shard, batch_size=16, epochs=2, drop_last=False,
                                        shuffle_buffer=32, seed=ray.train.get_context().get_world_rank(),
                                        cache=config["cache"]):
            assert batch["image"].shape[1:] == (1, 16, 16) and batch["image"].dtype == torch.float32
            assert -1 <= batch["image"].min() < batch["image"].max() <= 1
            seen[epoch] += batch["id"].tolist()
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json.dump(seen, f)
        ray.train.report({"rows": len(seen[0])})

    out = prepare("sprites", tmp_path / "p", num_samples=200, image_size=16, chunk_size=50)
    ids = set(read_split(out, "train").ids.tolist())
    assert len(ids) + len(read_split(out, "val")) == 180
    trainer = TorchTrainer(
        worker, train_loop_config={"out": str(tmp_path), "cache": cache},
        # fractional CPUs leave room for Ray Data on a 2-CPU node (docs/pipeline.md)
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
    if cache:   # each worker keeps its share, in a new order
        for r in (0, 1):
            assert set(seen[r]["0"]) == set(seen[r]["1"]) and seen[r]["0"] != seen[r]["1"]


def test_old_dataset_reads_the_same_rows_through_ray_data(ray_session, tmp_path):
    """A dataset prepared before validation splits: Ray Data's train and val are
    read_split's (carved by id from the train files), and sizing does not fail."""
    from pipelines.data.loading import decoded_mb, shard_fits_in_memory, train_dataset

    out = prepare("sprites", tmp_path / "p", num_samples=400, image_size=8, chunk_size=60,
                  val_portion=0)
    m = json.loads((out / "manifest.json").read_text())      # rewrite it as an old one
    del m["splits"]["val"], m["options"]["val_portion"], m["val_from"]
    for f in m["factors"]:
        del f["counts"]["val"], f["frequencies"]["val"]
    (out / "manifest.json").write_text(json.dumps(m))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain = {s: sorted(read_split(out, s).ids.tolist()) for s in ("train", "val")}
        streamed = {s: sorted(int(r["id"]) for r in train_dataset(out, s).take_all())
                    for s in ("train", "val")}
    assert [str(w.message) for w in record if "prepared before validation" in str(w.message)] == [
        f"{out} was prepared before validation splits; carving val (10% of train, by id) on the fly; "
        f"prepare it again to make this permanent"]
    assert streamed == plain and plain["val"] and set(plain["train"]).isdisjoint(plain["val"])
    assert len(plain["train"]) + len(plain["val"]) == m["splits"]["train"]["rows"]
    manifest = read_manifest(out)
    assert 0 < decoded_mb(manifest, "val", 8) < decoded_mb(manifest, "train", 8)
    assert shard_fits_in_memory(manifest, "val", 8, 2, 1)
