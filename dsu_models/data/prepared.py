"""Prepared datasets: write (shards, manifest, atomic rename) and read back.

Layout of a prepared directory ``DIR``::

    DIR/manifest.json            (see manifest.py)
    DIR/train/part-00000.parquet ...   one file per preparation task
    DIR/val/part-00000.parquet   ...   carved from train by id (splits.py) unless
                                       the source has its own; absent if val_portion=0
    DIR/test/part-00000.parquet  ...
    DIR/plot/part-00000.parquet        a small seeded subset of test

Columns: ``id`` int64 (stable, unique), ``image`` binary (lossless PNG), and
one int64 column per factor (every factor with ground truth; -1 where an
evaluation-only factor has no label).

A directory prepared before validation splits still reads: its ``val`` is
carved from its train files on the fly (``splits.row_filter``), with a warning.

:func:`prepare` runs the tasks in a loop in this process; the Ray job in
``pipelines/jobs/prepare.py`` runs :func:`run_task` in parallel and calls the
same :func:`begin` / :func:`finish`, so both write the same content. Output goes
to a hidden staging directory next to the target and is renamed into place
only when complete; a killed preparation leaves no ``manifest.json`` under
the target name, and its staging directory is removed by the next run.

Only a prepared dataset of ours is ever replaced (:func:`check_replaceable`):
an existing ``DIR`` that is anything else (a folder of the user's files, a
foreign ``manifest.json``, a dataset with files added to it, a file, a
symbolic link) is refused with or without ``overwrite``, before planning and
again just before the rename.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
import warnings
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
from .splits import LEGACY_VAL_PORTION, available_splits, is_legacy, row_filter, stored_split
from .sources._common import SPLIT_CODES, SPLITS, carve_val, check_labels

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
    # sparse {label: count}: the stats stay as small as the task whatever the class count
    counts = {s: [{} for _ in plan.factors] for s in SPLITS}
    notes: dict[str, dict] = {}     # {what was done: {"count", "first", "task"}}
    try:
        for chunk in plan.read(task):
            for what, files in chunk.notes.items():
                seen = notes.setdefault(what, {"count": 0, "first": files[0], "task": index})
                seen["count"] += len(files)
            images = _checked_images(plan, chunk)
            check_labels(chunk.labels, plan.factors, chunk.where or plan.source)
            codes = chunk.split
            if plan.val_from == "carved":
                codes = carve_val(codes, chunk.ids, float(plan.options["val_portion"]),
                                  int(plan.options["seed"]))
            for split in SPLITS:
                sel = np.flatnonzero(codes == SPLIT_CODES[split])
                if not len(sel):
                    continue
                cols = {"id": pa.array(chunk.ids[sel], pa.int64()),
                        "image": pa.array([encode_png(images[i]) for i in sel], pa.binary())}
                for j, f in enumerate(plan.factors):
                    cols[f.name] = pa.array(chunk.labels[sel, j], pa.int64())
                    seen = counts[split][j]
                    labels = chunk.labels[sel, j]
                    # an eval-only factor's unlabeled rows (-1) are not counted
                    for label, c in zip(*np.unique(labels[labels >= 0], return_counts=True)):
                        seen[int(label)] = seen.get(int(label), 0) + int(c)
                if split not in writers:
                    (staging / split).mkdir(parents=True, exist_ok=True)
                    writers[split] = pq.ParquetWriter(staging / split / f"part-{index:05d}.parquet",
                                                      schema)
                writers[split].write_table(pa.table(cols, schema=schema))
                rows[split] += len(sel)
    finally:
        for w in writers.values():
            w.close()
    return {"rows": rows,
            "counts": {s: [[sorted(c), [c[k] for k in sorted(c)]] for c in v]
                       for s, v in counts.items()},
            "notes": notes}


def _dense_counts(stats: list[dict], split: str, j: int, classes: int) -> np.ndarray:
    """Sum the tasks' sparse counts of factor j on ``split`` into (classes,) int64."""
    total = np.zeros(classes, np.int64)
    for st in stats:
        labels, counts = st["counts"][split][j]
        np.add.at(total, np.asarray(labels, np.int64), np.asarray(counts, np.int64))
    return total


def preparation_notes(stats: list[dict]) -> list[str]:
    """One line per kind of note the tasks made (``Chunk.notes``): how many
    images, and the first of them in task order (stats may arrive in any order)."""
    merged: dict[str, dict] = {}
    for st in stats:
        for what, note in st.get("notes", {}).items():
            m = merged.setdefault(what, {"count": 0, "first": note["first"], "task": note["task"]})
            m["count"] += note["count"]
            if note["task"] < m["task"]:
                m["first"], m["task"] = note["first"], note["task"]
    return [f"{m['count']} image(s) {what} (the first: {m['first']})" for what, m in merged.items()]


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


def planned_digest(plan: SourcePlan) -> str:
    """The content hash a preparation of ``plan`` will have (its manifest's ``content_hash``)."""
    return mf.content_hash(plan.source, plan.image_size, plan.options, plan.fingerprint)


def begin(source: str, out_dir, overwrite: bool = False, **options):
    """Plan a preparation. Returns (plan, digest, staging dir) or (None, digest, None)
    when ``out_dir`` already holds this exact preparation (hash match)."""
    out = Path(out_dir)
    check_replaceable(out, overwrite)        # refuse a foreign directory before planning
    plan = make_plan(source, options)
    digest = planned_digest(plan)
    if check_replaceable(out, overwrite, digest):
        return None, digest, None
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return plan, digest, staging


def finish(plan: SourcePlan, digest: str, staging: Path, out_dir, stats: list[dict]) -> Path:
    """Sum task stats, write the plot subset and the manifest, rename into place."""
    rows = {s: sum(st["rows"][s] for st in stats) for s in SPLITS}
    no_val = plan.val_from == "carved" and float(plan.options["val_portion"]) == 0
    for s in SPLITS:
        if rows[s] == 0 and not (s == "val" and no_val):
            hint = ("; pass a larger val_portion, or val_portion=0 for no validation split"
                    if s == "val" and plan.val_from == "carved" else "")
            raise DataError(f"{plan.source}: the {s} split is empty (options {plan.options}); "
                            f"nothing to {dict(train='train', val='validate', test='test')[s]} on"
                            f"{hint}")
    counts = {s: [_dense_counts(stats, s, j, f.classes) for j, f in enumerate(plan.factors)]
              for s in SPLITS}
    files = {s: sorted(p.name for p in (staging / s).glob("*.parquet")) for s in SPLITS}
    rows["plot"], files["plot"] = _write_plot(staging, int(plan.options["plot_size"]),
                                              int(plan.options["seed"]), plan.factors)
    name = plan.source if plan.source != "image_folder" else Path(plan.options["root"]).name
    m = mf.build_manifest(name, plan.source, plan.image_size, plan.channels, plan.factors, counts, rows,
                 files, plan.options, digest, plan.val_from)
    notes = preparation_notes(stats)
    if notes:   # what reading changed in the user's images; prepare_data.py prints them
        m["notes"] = notes
    mf.write(staging, m)
    return _commit(staging, Path(out_dir))


def abort(staging: Path | None) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(source: str, out_dir, *, overwrite: bool = False, **options) -> Path:
    """Prepare ``source`` into ``out_dir`` in this process (no Ray); returns the directory.

    options: the source's options (see ``sources/<name>.py`` ``OPTIONS``) plus
    image_size, test_portion (0.1), val_portion (0.1), seed (0), plot_size (64),
    chunk_size, resize.
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
    # begin() checked ``out``; check again, something may have appeared there meanwhile
    check_replaceable(out, overwrite=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)             # put the previous dataset back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


_WRITTEN = (mf.MANIFEST, *SPLITS, "plot")   # all that a prepared directory holds


def check_replaceable(out, overwrite: bool = False, digest: str | None = None) -> bool:
    """May a preparation be written to ``out``? DataError (one line, naming ``out``
    and why) if not; the CLI and the Ray job reach it through :func:`begin`.

    Returns True when ``out`` already holds the preparation with content hash
    ``digest`` (reuse it, write nothing); False when ``out`` may be written:
    it does not exist, is an empty directory, or is a prepared dataset of ours
    (a manifest this project wrote, any format version, and nothing else in
    it) and ``overwrite`` is set. A dataset of ours with another hash and no
    ``overwrite`` is refused, suggesting --overwrite; anything else is refused
    whatever ``overwrite`` says, since replacing it would delete the user's
    files. With ``digest=None`` (a check before planning) a dataset of ours is
    not refused yet: whether it is the same preparation needs the plan's hash.
    """
    out = Path(out)
    keep = "refusing to replace it: move it away or choose another --out"
    if out.is_symlink():
        raise DataError(f"{out} is a symbolic link (to {os.readlink(out)}); {keep}, or pass the "
                        f"directory it points to")
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; {keep}")
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise DataError(f"{out}: cannot list the directory ({e}); {keep}") from None
    if not entries:
        return False
    try:
        m = mf.own_manifest(out)
    except DataError as e:
        raise DataError(f"{e}; it holds {_some(entries)}; {keep}") from None
    extra = [n for n in entries if n not in _WRITTEN and n not in m["splits"]]
    for split, info in m["splits"].items():
        listed = set(info.get("files", ())) if isinstance(info, dict) else set()
        if split in entries and (out / split).is_dir():
            extra += [f"{split}/{n}" for n in sorted(os.listdir(out / split)) if n not in listed]
    if extra:
        raise DataError(f"{out} holds a prepared dataset but also {_some(extra)}, which preparation "
                        f"did not write; {keep.replace('move it', 'move them')}")
    if digest is not None and m["content_hash"] == digest and m["format_version"] == mf.FORMAT_VERSION:
        return True
    if digest is not None and not overwrite:
        raise DataError(f"{out} already holds a different preparation (source "
                        f"{m.get('source')!r}, format version {m.get('format_version')}, hash "
                        f"{m['content_hash'][:12]}; wanted {digest[:12]}); pass overwrite=True "
                        f"(--overwrite) to replace it")
    return False


def _some(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


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
_WARNED: set[str] = set()   # old directories warned about in this process


def split_files(directory, split: str) -> list:
    """The Parquet files that hold ``split``'s rows: Paths, or URI strings for a URI directory.

    For a dataset prepared before validation splits, ``train`` and ``val`` are
    both held in the train files: filter their rows with
    ``splits.row_filter(manifest, split)`` (:func:`read_split` and
    ``pipelines/data/loading.py`` do); a warning says so once per directory.
    """
    m = mf.read_manifest(directory)
    if split not in available_splits(m):
        raise DataError(f"{directory}: no split {split!r}; splits are {available_splits(m)}")
    if split == "val" and not is_legacy(m) and not m["splits"]["val"]["files"]:
        raise DataError(f"{directory} has no validation split (prepared with val_portion="
                        f"{m['options'].get('val_portion')}); prepare it again with a val_portion "
                        f"above 0 (--val-portion 0.1) to make one")
    if row_filter(m, split) is not None and str(directory) not in _WARNED:
        _WARNED.add(str(directory))
        warnings.warn(f"{directory} was prepared before validation splits; carving val "
                      f"({LEGACY_VAL_PORTION:.0%} of train, by id) on the fly; prepare it again to "
                      f"make this permanent", stacklevel=2)
    name = stored_split(m, split)
    return [mf.member(directory, name, f) for f in m["splits"][name]["files"]]


def read_split(directory, split: str, image_size: int | None = None) -> InMemoryDataset:
    """One split of a prepared directory in memory (plain pyarrow, no Ray), sorted by id.

    Returns images (N, C, S, S) uint8 at ``image_size`` (default: as stored),
    labels (N, F) int64 for every stored factor (-1 where an eval-only factor
    has no label), with train-split frequencies.
    """
    m = mf.read_manifest(directory)
    factors = mf.factor_infos(m)
    keep = row_filter(m, split)
    ids, images, labels = [], [], []
    for p in split_files(directory, split):
        t = pq.read_table(str(p))  # a URI is read through its pyarrow filesystem
        if keep is not None:
            t = t.filter(pa.array(keep(t["id"].to_numpy())))
        if not t.num_rows:
            continue
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
