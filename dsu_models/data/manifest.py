"""The prepared-dataset manifest: what a prepared directory holds.

``manifest.json`` records the format version, dataset name and source, image
size and channels, the factor table (name, classes, class names, per-split
counts and frequencies; for an evaluation-only factor ``"eval_only": true``
and ``labeled``, its labeled rows per split, which are all that its counts
count), rows and shard files per split, how the validation split was made
(``val_from``: ``"carved"`` from train by id, or the source's own, e.g.
``"csv"``), the resolved options and a content hash of inputs + options;
and, only when reading changed some of the inputs (e.g. transparency
composited onto white), ``notes``: one line per kind of change, with the count
and the first file. It is written last, so a directory without it is not a
prepared dataset.
Manifests written before validation splits have no ``val`` split and no
``val_from`` (see splits.py); before evaluation-only factors, no ``eval_only``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .base import FactorInfo
from .errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# options that change where inputs live or how work is cut up, not the content
LAYOUT_OPTIONS = ("chunk_size", "download", "root", "path", "csv")


def content_hash(source: str, image_size: int, options: dict, fingerprint: dict) -> str:
    """sha256 over the format version, source, content-relevant options and input fingerprint."""
    doc = {"format_version": FORMAT_VERSION, "source": source, "image_size": int(image_size),
           "options": {k: v for k, v in options.items() if k not in LAYOUT_OPTIONS},
           "inputs": fingerprint}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def build_manifest(name: str, source: str, image_size: int, channels: int, factors: list[FactorInfo],
          counts: dict[str, list[np.ndarray]], rows: dict[str, int], files: dict[str, list[str]],
          options: dict,
          digest: str, val_from: str = "carved") -> dict:
    """counts[split][j]: (classes_j,) label counts of factor j on that split (labeled rows only)."""
    table = []
    for j, f in enumerate(factors):
        c = {s: [int(x) for x in counts[s][j]] for s in counts}
        freq = {}
        for s, v in c.items():          # linear in classes: the total once per split
            total = max(sum(v), 1)
            freq[s] = [x / total for x in v]
        entry = {"name": f.name, "classes": f.classes, "class_names": list(f.names()),
                 "counts": c, "frequencies": freq}
        if f.eval_only:
            entry["eval_only"] = True
            entry["labeled"] = {s: sum(v) for s, v in c.items()}
        table.append(entry)
    return {
        "format_version": FORMAT_VERSION, "name": name, "source": source,
        "image_size": int(image_size), "channels": int(channels), "factors": table,
        "splits": {s: {"rows": int(rows[s]), "files": files.get(s, [])} for s in rows},
        "val_from": val_from,
        "content_hash": digest,
        "options": json.loads(json.dumps(options, default=str)),
    }


def write(directory: Path, manifest: dict) -> None:
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_uri(directory) -> bool:
    """A prepared dataset named by a URI that pyarrow's filesystems read
    (``s3://bucket/prepared/x``); ``file://`` and plain paths are local."""
    text = str(directory)
    return "://" in text and not text.startswith("file://")


def member(directory, *parts: str):
    """``directory/parts``: a Path for a local directory, a URI string for a URI."""
    if is_uri(directory):
        return "/".join([str(directory).rstrip("/"), *parts])
    return Path(directory).joinpath(*parts)


def _read_member(directory, name: str) -> str | None:
    """A small text file of a prepared directory (None when it is not there)."""
    if not is_uri(directory):
        path = Path(directory) / name
        return path.read_text(encoding="utf-8") if path.is_file() else None
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(member(directory, name))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def read_manifest(directory) -> dict:
    """The manifest of a prepared directory (a path, or a URI such as
    ``s3://bucket/prepared/x``); DataError if it is not one."""
    path = member(directory, MANIFEST)
    try:
        text = _read_member(directory, MANIFEST)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from e
    if text is None:
        raise DataError(f"{directory} is not a prepared dataset (no {MANIFEST}); "
                        f"run pipelines/prepare_data.py SOURCE --out {directory}")
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(m, dict):
        raise DataError(f"{path}: not a manifest of a prepared dataset (a JSON "
                        f"{type(m).__name__}, not an object)")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {m.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; prepare the dataset again")
    return m


_OWN_KEYS = ("format_version", "source", "factors", "splits", "content_hash")


def own_manifest(directory) -> dict:
    """The manifest of ``directory`` if this project wrote it, of any format version.

    DataError saying why not otherwise (no manifest, not JSON, not ours). Used
    to decide whether a directory may be replaced (``prepared.check_replaceable``).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared dataset (no {MANIFEST})")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{directory} is not a prepared dataset ({MANIFEST} is not readable "
                        f"JSON: {e})") from None
    missing = [k for k in _OWN_KEYS if k not in m] if isinstance(m, dict) else list(_OWN_KEYS)
    if missing or not isinstance(m["splits"], dict) or not isinstance(m["content_hash"], str):
        raise DataError(f"{directory} is not a prepared dataset ({MANIFEST} was not written by "
                        f"dsu_models.data: it lacks {missing or ['a valid splits table']})")
    return m


def factor_infos(manifest: dict) -> list[FactorInfo]:
    """Factor table with the train split's frequencies (docs/method.md section 1);
    ``eval_only`` as recorded (False in manifests from before that key)."""
    return [FactorInfo(f["name"], f["classes"], tuple(f["class_names"]),
                       tuple(f["frequencies"].get("train", ())), bool(f.get("eval_only", False)))
            for f in manifest["factors"]]
