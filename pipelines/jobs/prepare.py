"""Prepare any data source into the versioned Parquet format, as a Ray Data job
(command line: ``python pipelines/prepare_data.py SOURCE --out DIR``, see ``pipelines.cli``).

The source's plan is cut into tasks of ``--chunk-size`` rows; Ray Data runs
``dsu_models.data.prepared.run_task`` on each in parallel (read/decode,
resize, PNG-encode, write its own shard) and streams back only small stats,
so memory is bounded by one chunk per running task whatever the dataset size.
Planning, the plot subset, the manifest, the content hash and the atomic
rename are the library's (``prepare`` runs the same tasks in one process,
``--no-ray``), so both paths write the same content. Re-running with the same
inputs and options reuses the directory.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import pickle
from pathlib import Path

import numpy as np

from dsu_models.data.manifest import MANIFEST
from dsu_models.data.prepared import abort, begin, finish, run_task


class _RunTasks:
    """Ray Data actor: runs preparation tasks (one per batch row) into ``staging``.

    An actor pool rather than tasks because the workers that render and resize
    import torch (about 0.3 GiB each): task workers stay alive after the job and
    Ray hands them the torch-free decode tasks that later stream the prepared
    data to training (``benchmarks/ingest.py`` measured 0.46 GiB USS per decode
    worker instead of 0.13), while the pool's actors end with the preparation.
    """

    def __init__(self, plan, staging: str):
        self.plan, self.staging = plan, staging

    def __call__(self, batch: dict) -> dict:
        stats = [json.dumps(run_task(self.plan, int(i), pickle.loads(t), self.staging))
                 for i, t in zip(batch["index"], batch["task"])]
        return {"stats": np.array(stats, dtype=object)}


def prepare_with_ray(source: str, out_dir, *, overwrite: bool = False, progress=None, **options) -> Path:
    """Ray Data version of :func:`dsu_models.data.prepare` (same arguments, same output);
    ``progress(done, total)`` is told as the plan's tasks (chunks) finish."""
    import ray

    plan, digest, staging = begin(source, out_dir, overwrite, **options)
    if plan is None:
        return Path(out_dir)
    try:
        items = [{"index": i, "task": pickle.dumps(t)} for i, t in enumerate(plan.tasks)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # each task is a whole chunk already: one per batch, one CPU per actor
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        out = ds.map_batches(_RunTasks, batch_size=1, batch_format="numpy", num_cpus=1,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
                             fn_constructor_kwargs={"plan": dataclasses.replace(plan, tasks=[]),
                                                    "staging": str(staging)})
        stats = []
        for row in out.iter_rows():
            stats.append(json.loads(row["stats"]))
            if progress is not None:
                progress(len(stats), len(items))
        # the pool's actors live as long as the Dataset objects, which sit in
        # reference cycles: collect them now so the torch-laden workers exit
        # before training starts
        del ds, out
        gc.collect()
        return finish(plan, digest, staging, out_dir, stats)
    except BaseException:
        abort(staging)
        raise


def prepare_into(source: str, out: str, progress=None, **options) -> str:
    """Prepare ``source`` into ``out``: a path every node sees (the Ray Data job
    above), or a URI (``s3://...``), for which the preparation runs in this
    process into a local folder and is uploaded, the shards first and the
    manifest last, so a reader never takes a half-uploaded folder for a
    prepared one. A URI that already holds this preparation (same content
    hash) is reused. ``progress(done, total)``: see :func:`prepare_with_ray`."""
    from pipelines.cluster import storage

    if not storage.has_scheme(out):
        return str(prepare_with_ray(source, out, progress=progress, **options))
    import tempfile

    import pyarrow.fs as pafs

    from dsu_models.data import DataError, read_manifest
    from dsu_models.data.prepared import planned_digest, prepare
    from dsu_models.data.sources import make_plan

    digest = planned_digest(make_plan(source, options))
    try:
        if read_manifest(out).get("content_hash") == digest:
            return out
    except DataError:
        pass  # not there yet (or an older format): prepare it
    fs, root = storage.filesystem(out)
    local_fs = pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="dsu-prepare-") as tmp:
        local = prepare(source, Path(tmp) / "data", **options)
        manifest = Path(tmp) / MANIFEST
        (local / MANIFEST).rename(manifest)
        fs.create_dir(root, recursive=True)
        pafs.copy_files(str(local), root, source_filesystem=local_fs, destination_filesystem=fs)
        pafs.copy_files(str(manifest), storage.join(root, MANIFEST), source_filesystem=local_fs,
                        destination_filesystem=fs)
    return out
