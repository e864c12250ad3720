"""Prepared datasets: write (shards, manifest, atomic rename) and read back.

Layout of a prepared directory ``DIR``::

    DIR/manifest.json            (see manifest.py)
    DIR/train/part-00000.parquet ...   one file per preparation task
    DIR/test/part-00000.parquet  ...
    DIR/plot/part-00000.parquet        a small seeded subset of test

Columns: ``id`` int64 (stable, unique), ``image`` binary (lossless PNG), and
one int64 column per factor (every factor with ground truth).

:func:`prepare` runs the tasks in a loop in this process; the Ray job in
``pipelines/prepare_data.py`` runs :func:`run_task` in parallel and calls the
same :func:`begin` / :func:`finish`, so both write the same content. Output goes
to a hidden staging directory next to the target and is renamed into place
only when complete; a killed preparation leaves no ``manifest.json`` under
the target name, and its staging directory is removed by the next run.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import manifest as mf
from .codec import decode_batch, encode_png, resize_batch
from .base import FactorInfo, InMemoryDataset
from .errors import DataError
from .sources import SourcePlan, make_plan
from .sources._common import SPLITS, check_labels

# ---------------------------------------------------------------- writing
def _schema(factors: list[FactorInfo]) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("image", pa.binary())]
                     + [(f.name, pa.int64()) for f in factors])


def run_task(plan: SourcePlan, index: int, task: dict, staging: str | Path) -> dict:
    """Read one task's chunks, encode and write them; returns its small stats.

    Shards: ``staging/<split>/part-<index>.parquet`` (one row group per chunk).
    """
    staging = Path(staging)
    schema = _schema(plan.factors)
    writers: dict[str, pq.ParquetWriter] = {}
    rows = {s: 0 for s in SPLITS}
    counts = {s: [np.zeros(f.classes, np.int64) for f in plan.factors] for s in SPLITS}
    try:
        for chunk in plan.read(task):
            images = _checked_images(plan, chunk)
            check_labels(chunk.labels, plan.factors, chunk.where or plan.source)
            for code, split in enumerate(SPLITS):
                sel = np.flatnonzero(chunk.split == code)
                if not len(sel):
                    continue
                cols = {"id": pa.array(chunk.ids[sel], pa.int64()),
                        "image": pa.array([encode_png(images[i]) for i in sel], pa.binary())}
                for j, f in enumerate(plan.factors):
                    cols[f.name] = pa.array(chunk.labels[sel, j], pa.int64())
                    counts[split][j] += np.bincount(chunk.labels[sel, j], minlength=f.classes)
                if split not in writers:
                    (staging / split).mkdir(parents=True, exist_ok=True)
                    writers[split] = pq.ParquetWriter(staging / split / f"part-{index:05d}.parquet",
                                                      schema)
                writers[split].write_table(pa.table(cols, schema=schema))
                rows[split] += len(sel)
    finally:
        for w in writers.values():
            w.close()
    return {"rows": rows, "counts": {s: [c.tolist() for c in v] for s, v in counts.items()}}


def _checked_images(plan: SourcePlan, chunk) -> np.ndarray:
    """Chunk images as (n, H, W, C) at the plan's size; channel count enforced."""
    images = chunk.images
    n = len(chunk.ids)
    if images.ndim != 4 or len(images) != n or chunk.labels.shape != (n, len(plan.factors)):
        raise DataError(f"{plan.source} ({chunk.where}): chunk has images {images.shape}, "
                        f"labels {chunk.labels.shape} and {n} ids")
    if images.shape[-1] != plan.channels:
        raise DataError(f"{plan.source} ({chunk.where}): images have {images.shape[-1]} channels, "
                        f"expected {plan.channels}")
    if images.shape[1:3] != (plan.image_size, plan.image_size):
        images = resize_batch(images.transpose(0, 3, 1, 2), plan.image_size).transpose(0, 2, 3, 1)
    return images


def begin(source: str, out_dir, overwrite: bool = False, **options):
    """Plan a preparation. Returns (plan, digest, staging dir) or (None, digest, None)
    when ``out_dir`` already holds this exact preparation (hash match)."""
    plan = make_plan(source, options)
    digest = mf.content_hash(source, plan.image_size, plan.options, plan.fingerprint)
    out = Path(out_dir)
    if out.exists():
        try:
            existing = mf.read_manifest(out)
        except DataError:
            existing = None
        if existing is not None and existing.get("content_hash") == digest:
            return None, digest, None
        if not overwrite:
            what = "a different preparation" if existing else "something that is not a prepared dataset"
            raise DataError(f"{out} already exists and holds {what} (wanted hash {digest[:12]}); "
                            f"pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return plan, digest, staging


def finish(plan: SourcePlan, digest: str, staging: Path, out_dir, stats: list[dict]) -> Path:
    """Sum task stats, write the plot subset and the manifest, rename into place."""
    rows = {s: sum(st["rows"][s] for st in stats) for s in SPLITS}
    for s in SPLITS:
        if rows[s] == 0:
            raise DataError(f"{plan.source}: the {s} split is empty "
                            f"(options {plan.options}); nothing to {'train' if s == 'train' else 'test'} on")
    counts = {s: [np.sum([st["counts"][s][j] for st in stats], axis=0) for j in range(len(plan.factors))]
              for s in SPLITS}
    files = {s: sorted(p.name for p in (staging / s).glob("*.parquet")) for s in SPLITS}
    rows["plot"], files["plot"] = _write_plot(staging, int(plan.options["plot_size"]),
                                              int(plan.options["seed"]), plan.factors)
    name = plan.source if plan.source != "image_folder" else Path(plan.options["root"]).name
    m = mf.build(name, plan.source, plan.image_size, plan.channels, plan.factors, counts, rows,
                 files, plan.options, digest)
    mf.write(staging, m)
    return _commit(staging, Path(out_dir))


def abort(staging: Path | None) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(source: str, out_dir, *, overwrite: bool = False, **options) -> Path:
    """Prepare ``source`` into ``out_dir`` in this process (no Ray); returns the directory.

    options: the source's options (see ``sources/<name>.py`` ``OPTIONS``) plus
    image_size, test_portion (0.1), seed (0), plot_size (64), chunk_size, resize.
    Re-running with the same inputs and options returns at once (hash match).
    """
    plan, digest, staging = begin(source, out_dir, overwrite, **options)
    if plan is None:
        return Path(out_dir)
    try:
        light = dataclasses.replace(plan, tasks=[])
        stats = [run_task(light, i, t, staging) for i, t in enumerate(plan.tasks)]
        return finish(plan, digest, staging, out_dir, stats)
    except BaseException:
        abort(staging)
        raise


def _write_plot(staging: Path, size: int, seed: int, factors) -> tuple[int, list[str]]:
    """Seeded subset of ``size`` test rows, in id order, as plot/part-00000.parquet."""
    test_files = sorted((staging / "test").glob("*.parquet"))
    ids = np.concatenate([pq.read_table(p, columns=["id"])["id"].to_numpy() for p in test_files])
    size = min(size, len(ids))
    if size <= 0:
        return 0, []
    chosen = pa.array(np.sort(np.random.default_rng([seed, 0x9107]).choice(ids, size, replace=False)))
    parts = []
    for p in test_files:
        t = pq.read_table(p)
        parts.append(t.filter(pc.is_in(t["id"], value_set=chosen)))
    table = pa.concat_tables(parts).sort_by("id").cast(_schema(factors))
    (staging / "plot").mkdir()
    pq.write_table(table, staging / "plot" / "part-00000.parquet")
    return table.num_rows, ["part-00000.parquet"]


def _commit(staging: Path, out: Path) -> Path:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _remove_stale_staging(out: Path) -> None:
    """Delete staging dirs of earlier runs whose process is gone (killed preparations)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


# ---------------------------------------------------------------- reading
def split_files(directory, split: str) -> list[Path]:
    m = mf.read_manifest(directory)
    if split not in m["splits"]:
        raise DataError(f"{directory}: no split {split!r}; splits are {sorted(m['splits'])}")
    return [Path(directory) / split / f for f in m["splits"][split]["files"]]


def read_split(directory, split: str, image_size: int | None = None) -> InMemoryDataset:
    """One split of a prepared directory in memory (plain pyarrow, no Ray), sorted by id.

    Returns images (N, C, S, S) uint8 at ``image_size`` (default: as stored),
    labels (N, F) int64 for every stored factor, with train-split frequencies.
    """
    m = mf.read_manifest(directory)
    factors = mf.factor_infos(m)
    ids, images, labels = [], [], []
    for p in split_files(directory, split):
        t = pq.read_table(p)
        ids.append(t["id"].to_numpy())
        images.append(decode_batch(t["image"].to_pylist(), m["channels"]))
        labels.append(np.stack([t[f.name].to_numpy() for f in factors], 1))
    if not ids:
        raise DataError(f"{directory}: split {split!r} is empty")
    ids, images, labels = np.concatenate(ids), np.concatenate(images), np.concatenate(labels)
    order = np.argsort(ids, kind="stable")
    images = images[order]
    if image_size is not None:
        images = resize_batch(images, int(image_size))
    import torch  # here, not at module level: Ray workers run run_task without torch (see base.py)

    return InMemoryDataset(torch.from_numpy(np.ascontiguousarray(images)),
                           torch.from_numpy(labels[order].astype(np.int64)), factors,
                           torch.from_numpy(ids[order].astype(np.int64)), m["name"])
