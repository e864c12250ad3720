"""Training-side reader of prepared datasets with Ray Data, for Ray Train.

``train_dataset(dir)`` is ``read_parquet`` -> PNG decode in ``map_batches`` ->
columns ``id`` int64, ``image`` uint8 (C, H, W) at the wanted size and
``labels`` int64 (F,) in manifest factor order. Pass it as
``TorchTrainer(datasets={"train": ds})``; Ray Train gives each worker a
disjoint share per epoch (``streaming_split``). On the worker,
``iter_epochs(ray.train.get_dataset_shard("train"), batch_size)`` repeats
epochs, reshuffling each one (file order + a local shuffle buffer), or with
``cache=True`` serves epochs after the first from the worker's memory; it
yields images as float32 in [-1, 1]. The
plain single-process reader is ``dsu_models.data.read_split``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Iterator

import ray
import torch

from dsu_models.data import read_manifest, row_filter, split_files, split_rows, to_float
from pipelines.data.decode import Decode

# columns as Ray Data delivers them (and as the epoch cache keeps them);
# iter_epochs hands out images as float32 in [-1, 1]
DTYPES = {"id": torch.int64, "image": torch.uint8, "labels": torch.int64}


def train_dataset(directory, split: str = "train", image_size: int | None = None,
                  shuffle_blocks: bool = True, batch_size: int = 256) -> ray.data.Dataset:
    """A prepared split as a Ray Dataset: ``id`` (), ``image`` (C, S, S) uint8, ``labels`` (F,).

    The rows are :func:`dsu_models.data.read_split`'s: for a dataset prepared
    before validation splits, ``train`` and ``val`` read the train files and
    keep the rows ``row_filter`` picks by id (in the decode step, before decoding)."""
    m = read_manifest(directory)
    files = [str(p) for p in split_files(directory, split)]
    # shuffling the file order streams; randomize_block_order() is an all-to-all
    # step that would hold every block of the split in the object store at once
    with _parquet_reader_v1():
        ds = ray.data.read_parquet(files, shuffle="files" if shuffle_blocks else None)
    fn = Decode(m["channels"], int(image_size or m["image_size"]), [f["name"] for f in m["factors"]],
                row_filter(m, split))
    return ds.map_batches(fn, batch_size=batch_size, batch_format="numpy")


@contextlib.contextmanager
def _parquet_reader_v1():
    """Route ``read_parquet`` through Ray Data's V1 Parquet datasource while inside.

    Ray 2.60's default V2 reader lists files with a pool of up to 32
    ``FooterReader`` actors (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``), one process
    each, that read every footer; on a 480k-image split (235 files) 25 of them
    came up and summed USS reached 4.5 GiB, growing with the number of files.
    V1 takes local file sizes serially in the driver and samples 2-10 footers
    with ordinary tasks on the worker pool, so memory does not depend on the
    dataset size. The choice is made when ``read_parquet`` is called (V1 builds
    its datasource there), so the flag is restored right after.
    """
    ctx = ray.data.DataContext.get_current()
    old = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = old


def row_bytes(manifest: dict, image_size: int) -> int:
    """Bytes of one decoded row: uint8 image, int64 id and labels."""
    return manifest["channels"] * image_size ** 2 + 8 * (1 + len(manifest["factors"]))


def decoded_mb(manifest: dict, split: str, image_size: int) -> float:
    """MiB of ``split`` decoded."""
    return split_rows(manifest, split) * row_bytes(manifest, image_size) / 2 ** 20


def cluster_cached(ds: ray.data.Dataset, manifest: dict, split: str, image_size: int,
                   budget_mb: float) -> ray.data.Dataset:
    """``ds`` materialized in the cluster's object store when ``split`` decoded
    fits in ``budget_mb`` MiB (decoded once for every worker and epoch), else
    ``ds`` itself, streamed."""
    if budget_mb > 0 and decoded_mb(manifest, split, image_size) <= budget_mb:
        return ds.materialize()
    return ds


def shard_fits_in_memory(manifest: dict, split: str, image_size: int, workers: int,
                         budget_mb: float) -> bool:
    """Whether one worker's share of ``split``, decoded (uint8 images, int64 ids and
    labels), fits in ``budget_mb`` MiB. Every rank computes the same answer."""
    rows = split_rows(manifest, split)
    return budget_mb > 0 and math.ceil(rows / workers) * row_bytes(manifest, image_size) <= budget_mb * 2 ** 20


def iter_epochs(shard, batch_size: int, epochs: int | None = None, shuffle_buffer: int = 2048,
                seed: int = 0, drop_last: bool = True, device: str | None = None,
                cache: bool = False, raw: bool = False) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) over ``epochs`` passes (None = forever): ``id`` (B,) int64,
    ``image`` (B, C, H, W) float32 in [-1, 1], ``labels`` (B, F) int64, on ``device``.

    ``raw`` (a GPU worker): the images stay uint8 on the CPU, in page-locked
    memory when CUDA is there, for the stage to copy without blocking and to
    convert on the GPU (``Stage.to_device``): a quarter of the bytes of float32.

    Each pass re-reads the shard; rows are shuffled through a buffer of
    ``shuffle_buffer`` rows with a per-epoch seed (0 = no shuffling).

    ``cache=True`` keeps the rows of the first pass in memory and serves every
    later epoch from them in a fresh random order (a permutation per epoch, seeded
    by ``seed + epoch``): no re-reading and no decoding after the first epoch, so
    the Ray Data workers stop competing with training for the CPU. The worker
    keeps the same share of rows every epoch. Only for shards that fit (see
    :func:`shard_fits_in_memory`); all workers must make the same choice.
    """
    table = None
    for epoch in (itertools.count() if epochs is None else range(epochs)):
        if table is not None:
            for batch in _cached_epoch(table, batch_size, seed + epoch, drop_last):
                yield epoch, _for_training(batch, device, raw)
            continue
        kwargs = {}
        if shuffle_buffer:
            kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed + epoch}
        stored = []
        # when caching, the last partial batch is read too (kept, not yielded under drop_last)
        for arrays in shard.iter_batches(batch_size=batch_size, drop_last=drop_last and not cache,
                                         batch_format="numpy", **kwargs):
            batch = _to_torch(arrays)
            if cache:
                stored.append({k: batch[k].clone() for k in DTYPES})
                if drop_last and len(batch["id"]) < batch_size:
                    continue
            yield epoch, _for_training(batch, device, raw)
        if cache:
            if not stored:
                raise ValueError("iter_epochs: the shard is empty")
            table = {k: torch.cat([b[k] for b in stored]) for k in DTYPES}


def _to_torch(arrays: dict) -> dict:
    """Numpy batch -> CPU tensors as in DTYPES, in the calling thread.

    Ray's ``iter_torch_batches`` would build the tensors in its own formatting
    threads; a torch op large enough to go parallel there gives that long-lived
    thread an OpenMP team of its own, and libgomp, seeing more threads than
    CPUs, then wakes the training thread's team by sleeping and signalling
    instead of spinning: on 2 cores stage 1 ran about 25% slower
    (``benchmarks/ray_overhead.py``). Here the conversion is a zero-copy
    ``from_numpy`` (Decode already emits these dtypes) in the training thread.
    """
    out = {}
    for key, dtype in DTYPES.items():
        array = arrays[key]
        # Ray may hand out read-only views of its buffers; torch wants to own writable memory
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        out[key] = tensor.to(dtype=dtype)
    return out


def _for_training(batch: dict, device: str | None, raw: bool = False) -> dict:
    """Moves the batch to ``device`` (uint8 images: a quarter of the bytes to copy
    to a GPU) and maps the images to float32 in [-1, 1] there; ``raw``: leaves
    it uint8 on the CPU, page-locked when CUDA is available."""
    if raw:
        return {k: v.pin_memory() for k, v in batch.items()} if torch.cuda.is_available() else batch
    out = {k: v.to(device=device or "cpu") for k, v in batch.items()}
    out["image"] = to_float(out["image"])
    return out


def _cached_epoch(table: dict, batch_size: int, seed: int, drop_last: bool) -> Iterator[dict]:
    n = len(table["id"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    end = n - n % batch_size if drop_last else n
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size].to(table["id"].device)
        yield {k: v.index_select(0, index) for k, v in table.items()}
