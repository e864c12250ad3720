"""The finished stage 1 a stage-2 sweep reuses (docs/method.md section 8, inputs of stage 2).

Stage-2 trials never retrain stage 1: the driver loads, once, the stage-1
hand-off (E, G1, B1), the classifier hand-off, the distilled unknown codes
and their statistics, and ships them to every trial. Two sources:

- **MLflow** (the Ray pipeline): the ``stage1``, ``distill`` and
  ``classifier`` runs, found as the children of a pipeline run
  (``--pipeline-run``) or named one by one; each must be complete. Artifacts
  are read with ``pipelines.data.stage_inputs.load_upstream`` like the stage jobs do.
- **A runner directory** (``python -m dsu_models.train --out DIR``):
  ``DIR/stage1/handoff.pt``, ``DIR/stage1/codes.pt``, ``DIR/classifier/handoff.pt``.

Either way the result is ``{"stage1", "classifier", "code_stats", "codes"}``
with ``codes = {split: {"ids" sorted, "mu", "sigma"}}`` (or None when the
unknown code is empty), the form ``pipelines.data.stage_inputs.lookup_codes`` joins by id.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsu_models import distill as distill_mod
from dsu_models.config import Config, ConfigError, config_from_dict, flat_params
from pipelines.tracking import runs as tracking
from pipelines.data.stage_inputs import HANDOFF, load_upstream, read_code_parquet

NEEDED = ("stage1", "distill", "classifier")
# Config parts a stage-2 sweep may set differently from the stage 1 it reuses.
FREE_PREFIXES = ("stage2.", "lenc.", "evaluate.", "all_stages.")
FREE_KEYS = ("device", "compile", "worker_cache_mb")


def pipeline_runs(client, pipeline_run: str | None, named: dict[str, str | None]) -> dict[str, str]:
    """Run ids of the upstream stages: children of ``pipeline_run``, overridden
    by ``named`` ids; each must be a complete run of its stage."""
    runs: dict[str, str] = {}
    if pipeline_run:
        children = tracking.child_runs(client, pipeline_run)
        runs.update({s: children[s].info.run_id for s in NEEDED if s in children})
    runs.update({s: r for s, r in named.items() if r})
    for stage in ("stage1", "distill"):
        if stage not in runs:
            where = f"pipeline run {pipeline_run} has no {stage} run" if pipeline_run else f"no --{stage}-run"
            raise ValueError(f"stage-2 sweep: {where} (run stage1 and distill first)")
    for stage, run_id in runs.items():
        tracking.require_complete(client, run_id, stage)
    return runs


def from_mlflow(runs: dict[str, str], tracking_uri: str, workdir: Path) -> dict:
    up = load_upstream(runs, tracking_uri, workdir, need_codes=False)
    up["codes"] = None
    if config_from_dict(up["stage1"]["config"]).unknown_size:
        codes_dir = tracking.download(runs["distill"], "codes", tracking_uri, workdir / "distill")
        up["codes"] = {split: read_code_parquet(codes_dir / split) for split in ("train", "test")}
    return {k: up[k] for k in ("stage1", "classifier", "code_stats", "codes")}


def _sorted_codes(codes: dict) -> dict:
    order = torch.argsort(codes["ids"])
    return {k: codes[k][order] for k in ("ids", "mu", "sigma")}


def from_runner(directory: str | Path) -> dict:
    """Hand-offs and codes written by ``dsu_models.train.run`` into ``directory``."""
    d = Path(directory)

    def read(path: Path, required: bool):
        if not path.exists():
            if required:
                raise ValueError(f"runner directory {d}: {path.relative_to(d)} is missing "
                                 f"(has stage 1 finished there?)")
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    stage1 = read(d / "stage1" / HANDOFF, True)
    if not (d / "stage1" / "codes.pt").exists():
        raise ValueError(f"runner directory {d}: stage1/codes.pt is missing (the distilled codes)")
    distilled = distill_mod.load_codes(d / "stage1" / "codes.pt")
    codes = None
    if config_from_dict(stage1["config"]).unknown_size:
        codes = {split: _sorted_codes(distilled["codes"][split]) for split in ("train", "test")}
    return {"stage1": stage1, "classifier": read(d / "classifier" / HANDOFF, False),
            "code_stats": distilled["stats"], "codes": codes}


def load_reused(spec: dict, tracking_uri: str, workdir: Path) -> dict:
    """``spec``: ``{"kind": "mlflow", "runs": {stage: id}}`` or ``{"kind": "runner", "dir": DIR}``."""
    if spec["kind"] == "mlflow":
        return from_mlflow(spec["runs"], tracking_uri, workdir)
    return from_runner(spec["dir"])


def check_compatible(cfg: Config, upstream: dict):
    """The sweep's config must be the one stage 1 (and the classifier) were
    trained with, up to stage-2 and later settings."""
    if cfg.labeled_factors and upstream["classifier"] is None:
        raise ValueError("stage-2 sweep: the config has labeled factors but no classifier run/hand-off "
                         "was found (run the classifier stage first)")
    mine, theirs = flat_params(cfg), flat_params(config_from_dict(upstream["stage1"]["config"]))

    def fixed(key: str) -> bool:
        return not key.startswith(FREE_PREFIXES) and key not in FREE_KEYS

    diff = sorted(k for k in mine.keys() | theirs.keys()
                  if fixed(k) and mine.get(k) != theirs.get(k))
    if diff:
        shown = ", ".join(f"{k} (sweep {mine.get(k)}, stage 1 {theirs.get(k)})" for k in diff[:6])
        raise ConfigError(f"stage-2 sweep: the config differs from the one stage 1 was trained with: "
                          f"{shown}{' ...' if len(diff) > 6 else ''}. Leave --config out to use "
                          f"stage 1's config, or pass the config the pipeline ran with")
