"""Command lines of the Ray pipeline: the full chain and each stage alone.

Order: prepare (or reuse) the data -> stage1 -> distill -> classifier ->
stage2 -> lenc -> evaluate -> register. Everything that can be checked is checked before Ray starts:
the config (unknown keys, types, values), the dataset's presence, upstream
run ids. Each stage is one nested MLflow run under the pipeline's parent run;
``--resume PARENT_RUN_ID`` skips finished stages and continues an unfinished
one from its last Ray Train checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dsu_models.config import Config, ConfigError
from dsu_models.data import DataError
from dsu_models.data.sources.builtin import BUILTIN
from dsu_models.train import build_config
from pipelines import tracking
from pipelines.local_ray import init_ray, pipeline_cpus

STAGE_ORDER = ("stage1", "distill", "classifier", "stage2", "lenc", "evaluate", "register")
UPSTREAM = {"stage1": (), "distill": ("stage1",), "classifier": (),
            "stage2": ("stage1", "classifier", "distill"), "lenc": ("stage2", "distill"),
            "evaluate": ("stage1", "distill", "stage2", "lenc"), "register": ("evaluate",)}


def pipeline_stages(cfg: Config) -> list[str]:
    active = set(cfg.active_stages()) | {"distill", "evaluate", "register"}
    return [s for s in STAGE_ORDER if s in active]


def add_common(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="YAML file or preset name (quick, tiny)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. stage1.cla1_weight=0.3")
    parser.add_argument("--dataset", help="dataset name (same as dataset=NAME)")
    parser.add_argument("--data", help="prepared dataset directory (same as data_path=DIR)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per stage")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker failures a stage survives (restarts from its checkpoint)")
    parser.add_argument("--experiment", default="disunknown")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store; default sqlite:///$DSU_HOME/mlflow.db (~/.disunknown)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a local Ray instance (default: the cores + 1, "
                             "see local_ray.pipeline_cpus; ignored when joining RAY_ADDRESS)")
    parser.add_argument("--alias", default="champion",
                        help="registry alias the model takes when its evaluation summary beats the holder's")


def overrides_of(args) -> list[str]:
    extra = list(args.overrides)
    if args.dataset:
        extra.insert(0, f"dataset={args.dataset}")
    if args.data:
        extra.append(f"data_path={Path(args.data).resolve()}")
    return extra


def builtin_dir(cfg: Config) -> Path:
    """Where a built-in dataset is prepared: named by its content hash, so a
    changed generator or option never collides with an older preparation."""
    from dsu_models.data.manifest import content_hash
    from dsu_models.data.sources import make_plan
    plan = make_plan(cfg.dataset, builtin_options(cfg))
    digest = content_hash(cfg.dataset, plan.image_size, plan.options, plan.fingerprint)
    return tracking.dsu_home() / "prepared" / f"{cfg.dataset}-{cfg.image_size}px-{digest[:12]}"


def check_data(cfg: Config):
    """Before Ray: a prepared directory must be one; a built-in source must plan."""
    if cfg.data_path:
        from dsu_models.data import read_manifest
        read_manifest(cfg.data_path)
    elif cfg.dataset in BUILTIN:
        from dsu_models.data.sources import make_plan
        make_plan(cfg.dataset, builtin_options(cfg))
    else:
        raise ConfigError(f"dataset {cfg.dataset!r}: pass --data with a prepared dataset "
                          f"(python pipelines/prepare_data.py {cfg.dataset} --root DIR --out DIR)")


def builtin_options(cfg: Config) -> dict:
    opts = {"image_size": cfg.image_size, "seed": cfg.seed, "test_portion": cfg.test_portion}
    if cfg.dataset != "digits":
        opts["num_samples"] = cfg.num_samples
    return opts


def ensure_data(cfg: Config, config_arg, overrides: list[str]) -> tuple[Config, str]:
    """Prepare a built-in dataset (Ray Data job, reused when prepared before);
    returns the config re-resolved against the prepared manifest, and the dir."""
    if cfg.data_path:
        return cfg, str(Path(cfg.data_path).resolve())
    from pipelines.prepare_data import prepare_with_ray
    out = builtin_dir(cfg)
    print(f"[prepare] {cfg.dataset} -> {out}", flush=True)
    prepare_with_ray(cfg.dataset, out, **builtin_options(cfg))
    return build_config(config_arg, overrides + [f"data_path={out}"]), str(out)


def execute(stage: str, cfg: Config, data_dir: str, parent_id: str, runs: dict, args,
            tracking_uri: str, client, test_hooks: dict | None = None) -> str:
    """Run (or skip, if complete) one stage under ``parent_id``; returns its run id."""
    run_id, complete = tracking.stage_run(client, parent_id, stage, cfg)
    if complete:
        print(f"[{stage}] complete in run {run_id}; skipped", flush=True)
        return run_id
    upstream = {k: runs.get(k) for k in UPSTREAM[stage]}
    started = time.time()
    print(f"[{stage}] MLflow run {run_id}", flush=True)
    if stage == "distill":
        from pipelines.distill import run_distill
        run_distill(cfg, data_dir, upstream["stage1"], run_id, tracking_uri, use_gpu=args.gpu,
                    actors=max(1, args.workers))
    elif stage == "evaluate":
        from pipelines.evaluate_job import run_evaluate
        run_evaluate(cfg, data_dir, upstream, run_id, tracking_uri, use_gpu=args.gpu,
                     num_cpus=args.cpus_per_worker)
    elif stage == "register":
        from pipelines.evaluate_job import run_register
        outcome = run_register(cfg, upstream, run_id, tracking_uri, alias=args.alias)
        print(f"[register] {outcome.describe(args.alias)}", flush=True)
    else:
        from pipelines.stage_job import run_stage
        hooks = (test_hooks or {}).get(stage)
        run_stage(stage, cfg, data_dir, run_id, upstream, tracking_uri, workers=args.workers,
                  use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                  max_failures=args.max_failures, test_hooks=hooks)
    tracking.mark_complete(client, run_id)
    print(f"[{stage}] done in {time.time() - started:.0f} s", flush=True)
    return run_id


def _prologue(args, config_arg):
    """Config and data checks before Ray starts; returns (cfg, overrides)."""
    overrides = overrides_of(args)
    cfg = build_config(config_arg, overrides)
    check_data(cfg)
    return cfg, overrides


def full_main(argv: list[str] | None = None, test_hooks: dict | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="DisUnknown pipeline: prepare -> stage1 -> distill -> classifier -> stage2 -> lenc")
    add_common(parser)
    parser.add_argument("--resume", metavar="RUN_ID", help="re-enter a pipeline (its parent run id)")
    parser.add_argument("--stages", help="comma-separated subset, e.g. stage1,distill")
    args = parser.parse_args(argv)
    config_arg = args.config if (args.config or args.overrides or args.dataset or args.data
                                 or args.resume) else "quick"
    try:
        cfg, overrides = _prologue(args, config_arg)
        wanted = pipeline_stages(cfg)
        if args.stages:
            chosen = [s.strip() for s in args.stages.split(",")]
            bad = [s for s in chosen if s not in wanted]
            if bad:
                raise ConfigError(f"--stages: {bad} not among this config's stages {wanted}")
            wanted = [s for s in wanted if s in chosen]
        tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
        experiment_id = tracking.setup(tracking_uri, args.experiment)
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri)
        if args.resume:
            client.get_run(args.resume)  # fails early on an unknown id
        init_ray(args.num_cpus or pipeline_cpus())
        cfg, data_dir = ensure_data(cfg, config_arg, overrides)
        parent = args.resume or tracking.start_parent(client, experiment_id, cfg)
        print(f"pipeline run {parent} ({', '.join(wanted)})", flush=True)
        runs = {s: r.info.run_id for s, r in tracking.child_runs(client, parent).items()}
        for stage in wanted:
            runs[stage] = execute(stage, cfg, data_dir, parent, runs, args, tracking_uri, client,
                                  test_hooks)
        client.set_terminated(parent, "FINISHED")
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"finished pipeline run {parent}\n{tracking.ui_hint(tracking_uri)}", flush=True)
    return 0


def stage_main(stage: str, argv: list[str] | None = None, test_hooks: dict | None = None) -> int:
    """One stage alone, given its upstream run ids (e.g. re-run stage 2 with new weights)."""
    parser = argparse.ArgumentParser(description=f"Run the {stage} stage alone under a pipeline run")
    add_common(parser)
    parser.add_argument("--parent", help="pipeline (parent) run id to add this stage to; "
                                         "default: a new parent run")
    for up in UPSTREAM[stage]:
        parser.add_argument(f"--{up}-run", required=True, help=f"finished {up} run id")
    args = parser.parse_args(argv)
    try:
        cfg, overrides = _prologue(args, args.config)
        tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
        experiment_id = tracking.setup(tracking_uri, args.experiment)
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri)
        runs = {up: getattr(args, f"{up}_run") for up in UPSTREAM[stage]}
        for up, run_id in runs.items():
            tracking.require_complete(client, run_id, up)
        init_ray(args.num_cpus or pipeline_cpus())
        cfg, data_dir = ensure_data(cfg, args.config, overrides)
        parent = args.parent or tracking.start_parent(client, experiment_id, cfg,
                                                      name=f"disunknown-{cfg.dataset}-{stage}")
        run_id = execute(stage, cfg, data_dir, parent, runs, args, tracking_uri, client, test_hooks)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{stage} run {run_id} (pipeline run {parent})\n{tracking.ui_hint(tracking_uri)}", flush=True)
    return 0
