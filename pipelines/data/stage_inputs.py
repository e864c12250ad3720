"""A stage's inputs from its upstream MLflow runs: hand-offs and distilled codes.

Everything a stage starts from is downloaded by run id from the tracking
server (never read from a path on the driver's node), so a stage's workers can
run on any node.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dsu_models.files import load_torch
from dsu_models.stages import STAGE_CLASSES
from pipelines.tracking import runs as tracking

HANDOFF = "handoff.pt"


def read_code_parquet(directory: Path) -> dict:
    """Distilled codes written by the distill job: ``ids`` sorted, ``mu``, ``sigma``."""
    tables = [pq.read_table(p) for p in sorted(Path(directory).glob("*.parquet"))]
    ids = np.concatenate([t["id"].to_numpy() for t in tables])

    def matrix(col):
        parts = []
        for t in tables:
            c = t[col].combine_chunks()
            parts.append(c.flatten().to_numpy(zero_copy_only=False).reshape(len(t), -1))
        return np.concatenate(parts).astype(np.float32)

    mu, sigma = matrix("mu"), matrix("sigma")
    order = np.argsort(ids)
    return {"ids": torch.from_numpy(ids[order]), "mu": torch.from_numpy(mu[order]),
            "sigma": torch.from_numpy(sigma[order])}


def lookup_codes(codes: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Join by id: (mu, sigma) rows for ``ids``; error naming a missing id."""
    ids = ids.cpu()
    pos = torch.searchsorted(codes["ids"], ids).clamp(max=len(codes["ids"]) - 1)
    missing = codes["ids"][pos] != ids
    if missing.any():
        raise KeyError(f"no distilled unknown code for image id {int(ids[missing][0])}; "
                       f"was the distill run made from this dataset?")
    return codes["mu"][pos], codes["sigma"][pos]


def load_upstream(runs: dict, tracking_uri: str, workdir: Path, need_codes: bool) -> dict:
    """A step's inputs from its upstream runs (``{step: run id or None}``): every
    training stage's hand-off under its name (None where ``runs`` has no run of
    it), the code statistics (``code_stats``) and, with ``need_codes``, the
    distilled codes."""
    def handoff(key):
        if not runs.get(key):
            return None
        return load_torch(tracking.download(runs[key], HANDOFF, tracking_uri, workdir / key))

    out: dict = {key: handoff(key) for key in STAGE_CLASSES}
    out.update(code_stats=None, codes=None)
    if runs.get("distill"):
        stats = tracking.download(runs["distill"], "stats.pt", tracking_uri, workdir / "distill")
        out["code_stats"] = load_torch(stats)
        if need_codes:
            codes_dir = tracking.download(runs["distill"], "codes", tracking_uri, workdir / "distill")
            out["codes"] = {split: read_code_parquet(codes_dir / split) if (codes_dir / split).exists() else None
                            for split in ("train", "test")}
    return out
