"""Training-side reader of prepared datasets with Ray Data, for Ray Train.

``train_dataset(dir)`` is ``read_parquet`` -> PNG decode in ``map_batches`` ->
columns ``id`` int64, ``image`` float32 (C, H, W) in [-1, 1] at the wanted
size and ``labels`` int64 (F,) in manifest factor order. Pass it as
``TorchTrainer(datasets={"train": ds})``; Ray Train gives each worker a
disjoint share per epoch (``streaming_split``). On the worker,
``iter_epochs(ray.train.get_dataset_shard("train"), batch_size)`` repeats
epochs, reshuffling each one (file order + a local shuffle buffer). The
plain single-process reader is ``dsu_models.data.read_split``.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import ray
import torch

from dsu_models.data import read_manifest, split_files
from pipelines.decode import Decode

DTYPES = {"id": torch.int64, "image": torch.float32, "labels": torch.int64}


def train_dataset(directory, split: str = "train", image_size: int | None = None,
                  shuffle_blocks: bool = True, batch_size: int = 256) -> ray.data.Dataset:
    """A prepared split as a Ray Dataset: ``id`` (), ``image`` (C, S, S) float32, ``labels`` (F,)."""
    m = read_manifest(directory)
    files = [str(p) for p in split_files(directory, split)]
    # shuffling the file order streams; randomize_block_order() is an all-to-all
    # step that would hold every block of the split in the object store at once
    with _parquet_reader_v1():
        ds = ray.data.read_parquet(files, shuffle="files" if shuffle_blocks else None)
    fn = Decode(m["channels"], int(image_size or m["image_size"]), [f["name"] for f in m["factors"]])
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


def iter_epochs(shard, batch_size: int, epochs: int | None = None, shuffle_buffer: int = 2048,
                seed: int = 0, drop_last: bool = True, device: str | None = None
                ) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) over ``epochs`` passes (None = forever); batch tensors as in DTYPES.

    Each pass re-reads the shard; rows are shuffled through a buffer of
    ``shuffle_buffer`` rows with a per-epoch seed (0 = no shuffling).
    """
    for epoch in (itertools.count() if epochs is None else range(epochs)):
        kwargs = {}
        if shuffle_buffer:
            kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed + epoch}
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=drop_last,
                                              dtypes=DTYPES, device=device or "cpu", **kwargs):
            yield epoch, batch
