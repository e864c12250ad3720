"""Prepare any data source into the versioned Parquet format, as a Ray Data job.

    python pipelines/prepare_data.py SOURCE --out DIR [options]

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

import argparse
import dataclasses
import gc
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from dsu_models.data import DataError, get_source, prepare
from dsu_models.data.prepared import abort, begin, finish, run_task
from pipelines.local_ray import init_ray


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


def prepare_with_ray(source: str, out_dir, *, overwrite: bool = False, **options) -> Path:
    """Ray Data version of :func:`dsu_models.data.prepare` (same arguments, same output)."""
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
        stats = [json.loads(r["stats"]) for r in out.iter_rows()]
        # the pool's actors live as long as the Dataset objects, which sit in
        # reference cycles: collect them now so the torch-laden workers exit
        # before training starts
        del ds, out
        gc.collect()
        return finish(plan, digest, staging, out_dir, stats)
    except BaseException:
        abort(staging)
        raise


def _classes(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        out[name.strip()] = int(n)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="one of: " + ", ".join(sorted(__import__(
        "dsu_models.data.sources", fromlist=["SOURCES"]).SOURCES)))
    p.add_argument("--out", required=True, help="prepared directory to write")
    p.add_argument("--root", help="data root (torchvision sources, rendered_chairs, image folder)")
    p.add_argument("--path", help="dataset file (dsprites .npz, 3dshapes .h5)")
    p.add_argument("--csv", help="image_folder: label CSV (default ROOT/labels.csv)")
    p.add_argument("--file-column", help="image_folder: CSV column with file paths")
    p.add_argument("--factors", help="image_folder: comma-separated factor columns (others are errors)")
    p.add_argument("--classes", help="image_folder: declared class counts, e.g. 'color=3,size=4'")
    p.add_argument("--channels", type=int, help="image_folder: 1 or 3 (default: first image's)")
    p.add_argument("--download", action="store_true", help="torchvision sources: download to --root")
    p.add_argument("--no-extra", action="store_true", help="svhn: leave out extra_32x32.mat")
    p.add_argument("--relabel-orientation", action="store_true",
                   help="dsprites: relabel square/ellipse orientations (METHOD.md section 10)")
    p.add_argument("--crop", type=float, help="chairs3d: centred crop fraction")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-samples", type=int, help="procedural sources: seeded subset of the grid")
    p.add_argument("--test-portion", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--plot-size", type=int)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--resize", action="store_true", help="resize images of other sizes/channels")
    p.add_argument("--overwrite", action="store_true", help="replace a different preparation")
    p.add_argument("--no-ray", action="store_true", help="prepare in this process, without Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    return p.parse_args(argv)


def options_from_args(a: argparse.Namespace) -> dict:
    """CLI flags -> source options; flags left unset are not passed (source defaults apply)."""
    opts = {"root": a.root, "path": a.path, "csv": a.csv, "file_column": a.file_column,
            "factors": a.factors, "classes": _classes(a.classes), "channels": a.channels,
            "crop": a.crop, "image_size": a.image_size, "num_samples": a.num_samples,
            "test_portion": a.test_portion, "seed": a.seed, "plot_size": a.plot_size,
            "chunk_size": a.chunk_size}
    opts = {k: v for k, v in opts.items() if v is not None}
    for flag, key, value in ((a.download, "download", True), (a.no_extra, "extra", False),
                             (a.relabel_orientation, "relabel_orientation", True),
                             (a.resize, "resize", True)):
        if flag:
            opts[key] = value
    return opts


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        get_source(a.source)
        opts = options_from_args(a)
        t0 = time.time()
        if a.no_ray:
            out = prepare(a.source, a.out, overwrite=a.overwrite, **opts)
        else:
            init_ray(a.num_cpus, dashboard=False)
            out = prepare_with_ray(a.source, a.out, overwrite=a.overwrite, **opts)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dsu_models.data import read_manifest

    m = read_manifest(out)
    rows = {s: v["rows"] for s, v in m["splits"].items()}
    print(f"{out}: {m['name']} {m['image_size']}px x{m['channels']} rows {rows} "
          f"hash {m['content_hash'][:12]} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
