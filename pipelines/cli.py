"""Command lines of the Ray pipeline: the full chain (``full_main``), one step
alone (``stage_main``) and data preparation (``prepare_main``); the scripts
``pipelines/full.py``, ``stage.py`` and ``prepare_data.py`` and the console
scripts ``disunknown-pipeline``, ``disunknown-stage`` and ``disunknown-prepare``
call them. (Sweeps: ``pipelines.sweeps.driver``.)

Order (the step table ``dsu_models.steps``, after preparing or reusing the
data): stage1 -> distill -> classifier -> stage2 -> lenc -> evaluate -> register. Everything
that can be checked is checked before Ray starts:
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

from dsu_models.config import Config, ConfigError, config_diff, load_resolved
from dsu_models.recipe import configured, describe_choices, speed_override
from dsu_models.data import DataError
from dsu_models.data.codec import SQUARE_MODES
from dsu_models.data.sources.builtin import BUILTIN, sample_count
from dsu_models import steps as steps_module
from dsu_models.steps import RAY, check_runner, step as table_step, steps_for
from pipelines import console
from pipelines.cluster import storage
from pipelines.cluster.ray_init import init_ray, pipeline_cpus
from pipelines.cluster.stopping import interrupt_status, stop_on_sigterm, stop_reason
from pipelines.tracking import runs as tracking


def _train(step, cfg, data_dir, run_id, upstream, args, tracking_uri):
    from pipelines.jobs.stage_train import fit_stage
    fit_stage(step.name, cfg, data_dir, run_id, upstream, tracking_uri, workers=args.workers,
              use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
              reporter=console.reporter())


def _distill(step, cfg, data_dir, run_id, upstream, args, tracking_uri):
    from pipelines.jobs.distill_actors import run_distill
    run_distill(cfg, data_dir, upstream["stage1"], run_id, tracking_uri, use_gpu=args.gpu,
                actors=max(1, args.workers))


def _evaluate(step, cfg, data_dir, run_id, upstream, args, tracking_uri):
    from pipelines.jobs.evaluate_and_register import run_evaluate
    run_evaluate(cfg, data_dir, upstream, run_id, tracking_uri, use_gpu=args.gpu,
                 num_cpus=args.cpus_per_worker, reporter=console.reporter())


def _register(step, cfg, data_dir, run_id, upstream, args, tracking_uri):
    from pipelines.jobs.evaluate_and_register import run_register
    outcome = run_register(cfg, upstream, run_id, tracking_uri, alias=args.alias)
    console.say(f"[register] {outcome.describe(args.alias)}")


# How the Ray pipeline runs each kind of step of the table (dsu_models.steps,
# docs/pipeline.md): each step is a nested MLflow run of the pipeline's parent
# run and reads its inputs from its upstream steps' runs.
RUNNERS = {"train": _train, "distill": _distill, "evaluate": _evaluate, "register": _register}
check_runner(RAY, RUNNERS)


def pipeline_stages(cfg: Config) -> list[str]:
    """The steps the pipeline runs for ``cfg``, in order."""
    check_runner(RAY, RUNNERS)
    return [s.name for s in steps_for(cfg, RAY)]


def add_common(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="YAML file or preset name (quick, quality, fine, tiny); "
                                         "without it, the default recipe for budget_minutes")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. stage1.cla1_weight=0.3")
    parser.add_argument("--dataset", help="dataset name (same as dataset=NAME)")
    parser.add_argument("--data", help="prepared dataset directory (same as data_path=DIR)")
    parser.add_argument("--storage", metavar="URI",
                        help="storage every node reaches: a shared folder or s3://, gs://... "
                             "(same as storage=URI; default $DSU_STORAGE, else $DSU_HOME)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per stage")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker failures a stage survives (restarts from its checkpoint)")
    parser.add_argument("--experiment", default="disunknown")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///$DSU_HOME/mlflow.db (~/.disunknown)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a local Ray instance (default: the cores + 1, "
                             "see pipelines.cluster.ray_init.pipeline_cpus; ignored when joining RAY_ADDRESS)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and MLflow's own messages on the console (by default they go "
                             "to a log file named at start)")
    parser.add_argument("--alias", default="champion",
                        help="registry alias the model takes when it meets the champion bar "
                             "(evaluate.champion_*) and its val_summary beats the holder's")


def overrides_of(args) -> list[str]:
    extra = list(args.overrides)
    if args.dataset:
        extra.insert(0, f"dataset={args.dataset}")
    if args.data:
        extra.append(f"data_path={args.data if storage.has_scheme(args.data) else Path(args.data).resolve()}")
    if args.storage:
        extra.append(f"storage={args.storage}")
    return extra


def builtin_dir(cfg: Config) -> str:
    """Where a built-in dataset is prepared (a path or a URI under the storage):
    named by its content hash, so a changed generator or option never collides
    with an older preparation."""
    from dsu_models.data.prepared import planned_digest
    from dsu_models.data.sources import make_plan
    digest = planned_digest(make_plan(cfg.dataset, builtin_options(cfg)))
    return storage.join(storage.resolve_root(cfg.storage), "prepared",
                        f"{cfg.dataset}-{cfg.image_size}px-{digest[:12]}")


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
    """The source options a built-in dataset is prepared with: what ``load_builtin``
    draws for the same config in the single-process runner."""
    return {"image_size": cfg.image_size, "seed": cfg.seed, "test_portion": cfg.test_portion,
            "val_portion": cfg.val_portion, "num_samples": sample_count(cfg.dataset, cfg.num_samples)}


def ensure_data(cfg: Config, config_arg, overrides: list[str]) -> tuple[Config, str]:
    """Prepare a built-in dataset (Ray Data job, reused when prepared before);
    returns the config re-resolved against the prepared manifest, and the dir."""
    if cfg.data_path:
        return cfg, cfg.data_path if storage.has_scheme(cfg.data_path) else str(Path(cfg.data_path).resolve())
    from pipelines.jobs.prepare import prepare_into
    out = builtin_dir(cfg)
    console.say(f"[prepare] {cfg.dataset} -> {out}")
    prepare_into(cfg.dataset, out, progress=lambda done, total: console.bar("prepare", done, total),
                 **builtin_options(cfg))
    return configured(config_arg, overrides + [f"data_path={out}"]), out


def execute(stage: str, cfg: Config, data_dir: str, parent_id: str, runs: dict, args,
            tracking_uri: str, client) -> str:
    """Run (or skip, if complete) one stage under ``parent_id``; returns its run id.
    A stage that fails leaves its run FAILED (KILLED on an interrupt)."""
    run_id, complete = tracking.stage_run(client, parent_id, stage, cfg)
    if complete:
        console.say(f"[{stage}] complete in run {run_id}; skipped")
        console.step_finished(stage, 0.0)
        return run_id
    upstream = {k: runs.get(k) for k in table_step(stage).upstream}
    started = time.time()
    console.say(f"[{stage}] MLflow run {run_id}")
    try:
        step = table_step(stage)
        RUNNERS[step.kind](step, cfg, data_dir, run_id, upstream, args, tracking_uri)
    except BaseException as exc:
        tracking.mark_failed(client, run_id, status=_end_status(exc))
        raise
    tracking.mark_complete(client, run_id)
    console.flush()
    console.step_finished(stage, time.time() - started)
    console.say(f"[{stage}] done in {time.time() - started:.0f} s")
    return run_id


def _end_status(exc: BaseException) -> str:
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def _prologue(args, config_arg):
    """Config and data checks before Ray starts; returns (cfg, overrides).
    With no config named, the default recipe (``dsu_models.recipe``) sets the
    schedule; its budget and measured speed join the overrides, so the config
    re-read once the data are prepared is the same (not measured again)."""
    overrides = overrides_of(args)
    cfg = configured(config_arg, overrides, default=True)
    if cfg.budget_minutes is not None:
        overrides = overrides + [f"budget_minutes={cfg.budget_minutes}", speed_override(cfg.step_seconds)]
    check_data(cfg)
    return pin_storage(cfg, overrides)


def pin_storage(cfg: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """The config with its storage root resolved (``--storage``, ``storage:``,
    ``$DSU_STORAGE``, ``$DSU_HOME``), so the runs log where their checkpoints and
    data went and a resume finds them there."""
    import dataclasses

    root = storage.resolve_root(cfg.storage)
    if cfg.storage == root:
        return cfg, overrides
    return dataclasses.replace(cfg, storage=root), overrides + [f"storage={root}"]


def join_cluster(args, cfg: Config, tracking_uri: str):
    """Start or join Ray; on several nodes, prove the storage and the MLflow
    store reach every one of them (``pipelines.cluster.storage``)."""
    ray = init_ray(args.num_cpus or pipeline_cpus(), log_to_driver=args.verbose)
    console.connect()
    nodes = storage.check_reachable(cfg.storage, tracking_uri, ray,
                                    grows=storage.cluster_grows(bool(os.environ.get("RAY_ADDRESS"))))
    if nodes > 1:
        console.say(f"[cluster] {nodes} nodes; storage {cfg.storage}")


def check_launch(cfg: Config, args, stages: list[str]):
    """Before Ray: the flags that size the Ray jobs must fit the config."""
    from pipelines.jobs.stage_train import check_batch_split
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: at least 1")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker {args.cpus_per_worker}: must be positive")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures {args.max_failures}: 0 or more (-1: no limit)")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus {args.num_cpus}: at least 1")
    for stage in stages:
        if table_step(stage).kind == "train":
            check_batch_split(cfg, stage, args.workers)
    if cfg.device.startswith("cuda") and not args.gpu:
        raise ConfigError(f"device: {cfg.device!r}: Ray gives workers a GPU only with --gpu "
                          f"(or leave device=auto)")
    if args.gpu:
        if cfg.device == "cpu":
            raise ConfigError("--gpu with device: 'cpu': drop one of them (device=auto uses the GPU)")
        import os
        if not os.environ.get("RAY_ADDRESS"):
            import torch
            if torch.cuda.device_count() < args.workers:
                raise ConfigError(f"--gpu: {args.workers} worker(s) need as many GPUs and this machine "
                                  f"has {torch.cuda.device_count()} (set RAY_ADDRESS to use a cluster)")


def resume_config(args, client, tracking_uri: str) -> tuple[Config, str, list[str], list[str]]:
    """The config of the pipeline run ``--resume`` names, as it last recorded it
    (``config.yaml``, replaced by each ``--change-config``); returns (cfg,
    config_arg, overrides, changed keys) for the rest of the pipeline.
    ``--config`` and overrides may only change it with ``--change-config``, and
    the keys that would change are named either way."""
    import tempfile
    tracking.pipeline_run(client, args.resume, flag="--resume")
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.logged_config(args.resume, tracking_uri, tmp)
        logged = load_resolved(path)
        if not logged.data_path:  # a pipeline logs its config once its data is prepared
            raise ConfigError(f"--resume {args.resume}: the run's config names no data_path")
        overrides = overrides_of(args)
        if not (args.config or overrides):
            return logged, None, [], []
        for key in ("data_path", "storage"):  # where it was prepared and checkpointed
            if getattr(logged, key) and not any(o.startswith(f"{key}=") for o in overrides):
                overrides.append(f"{key}={getattr(logged, key)}")
        config_arg = args.config or str(path)
        asked = configured(config_arg, overrides)
    changed = config_diff(logged, asked)
    if changed and not args.change_config:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError(f"--resume {args.resume}: the config given differs from the run's in {shown}; "
                          f"resume without --config/overrides to continue the run as it was, or add "
                          f"--change-config to continue it with the new values")
    if changed:
        console.say(f"[resume] continuing with changed keys: {', '.join(changed)}")
    return asked, (args.config or None), overrides, changed


def full_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="DisUnknown pipeline: prepare -> stage1 -> distill -> classifier -> stage2 -> lenc")
    add_common(parser)
    parser.add_argument("--resume", metavar="RUN_ID", help="re-enter a pipeline (its parent run id); "
                                                           "the run's own config is used")
    parser.add_argument("--change-config", action="store_true",
                        help="with --resume: continue with a different --config/overrides")
    parser.add_argument("--stages", help="comma-separated subset, e.g. stage1,distill")
    args = parser.parse_intermixed_args(argv)
    with console.Console("pipeline", verbose=args.verbose):
        return _full(args)


def _full(args) -> int:
    """:func:`full_main` after its arguments are read, inside its console."""
    stop_on_sigterm()   # SIGTERM stops it as Ctrl-C does (init_ray installs it again over Ray's)
    parent = None
    client = None
    try:
        tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
        from mlflow.tracking import MlflowClient
        if args.resume:  # the run's own config, from its store
            experiment_id = tracking.setup(tracking_uri, args.experiment)
            client = MlflowClient(tracking_uri)
            cfg, config_arg, overrides, changed = resume_config(args, client, tracking_uri)
            check_data(cfg)
            cfg, overrides = pin_storage(cfg, overrides)
        else:  # a bad config touches nothing, not even the store
            config_arg = args.config   # None: the default recipe
            cfg, overrides = _prologue(args, config_arg)
        wanted = pipeline_stages(cfg)
        if args.stages:
            chosen = [s.strip() for s in args.stages.split(",")]
            bad = [s for s in chosen if s not in wanted]
            if bad:
                raise ConfigError(f"--stages: {bad} not among this config's stages {wanted}")
            wanted = [s for s in wanted if s in chosen]
        check_launch(cfg, args, wanted)
        if not args.resume:
            experiment_id = tracking.setup(tracking_uri, args.experiment)
            client = MlflowClient(tracking_uri)
        join_cluster(args, cfg, tracking_uri)
        cfg, data_dir = ensure_data(cfg, config_arg, overrides)
        if args.resume:
            parent = args.resume
            client.update_run(parent, status="RUNNING")
            # recorded on the parent (and on each stage run it re-enters, tracking.stage_run)
            tracking.record_config_change(client, parent, cfg, changed)
        else:
            parent = tracking.start_parent(client, experiment_id, cfg)
        console.plan(cfg, wanted)
        console.say(f"pipeline run {parent} ({', '.join(wanted)})")
        if cfg.budget_minutes is not None:
            console.say(f"[recipe] {describe_choices(cfg)}")
        runs = {s: r.info.run_id for s, r in tracking.child_runs(client, parent).items()}
        for stage in wanted:
            runs[stage] = execute(stage, cfg, data_dir, parent, runs, args, tracking_uri, client)
        client.set_terminated(parent, "FINISHED")
    except BaseException as exc:
        if parent is not None:
            tracking.mark_failed(client, parent, status=_end_status(exc))
        code = _report_failure(exc, parent)
        if code is None:
            raise
        return code
    print(f"finished pipeline run {parent}\n{tracking.ui_hint(tracking_uri)}", flush=True)
    return 0


def _report_failure(exc: BaseException, parent: str | None) -> int | None:
    """One line on stderr and the exit code for a pipeline that stopped: 2 for a
    user error (config, data, flags), 1 for a failure after start (the runs are
    FAILED; ``--resume`` continues it), 130 / 143 when Ctrl-C / SIGTERM stopped
    it (the runs are KILLED; ``pipelines.cluster.stopping``; Ray shuts down as
    the process exits, by Ray's exit hook, once the console no longer asks it for
    lines: shut down here, a late ``ray.get`` would start a new local Ray);
    None: let it propagate (SystemExit and the like)."""
    if isinstance(exc, KeyboardInterrupt):
        runs = (f"; its MLflow runs are marked KILLED; continue it with --resume {parent}"
                if parent is not None else "")
        print(f"stopped by {stop_reason(exc)}{runs}", file=sys.stderr)
        return interrupt_status(exc)
    if isinstance(exc, (ConfigError, DataError, ValueError)):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not isinstance(exc, Exception):
        return None
    cause = getattr(exc, "cause", None) or exc
    line = f"{type(cause).__name__}: {cause}".strip().splitlines()
    print(f"error: the pipeline failed: {line[0] if line else type(cause).__name__}", file=sys.stderr)
    if parent is not None:
        print(f"its MLflow runs are marked FAILED; continue it with --resume {parent}", file=sys.stderr)
    return 1


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """One stage alone, given its upstream run ids (e.g. re-run stage 2 with new weights)."""
    parser = argparse.ArgumentParser(description=f"Run the {stage} stage alone under a pipeline run")
    add_common(parser)
    parser.add_argument("--parent", help="pipeline (parent) run id to add this stage to; "
                                         "default: a new parent run")
    for up in table_step(stage).upstream:
        parser.add_argument(f"--{up}-run", required=True, help=f"finished {up} run id")
    args = parser.parse_intermixed_args(argv)
    with console.Console(stage, verbose=args.verbose):
        return _one_stage(stage, args)


def _one_stage(stage: str, args) -> int:
    """:func:`stage_main` after its arguments are read, inside its console."""
    stop_on_sigterm()   # SIGTERM stops it as Ctrl-C does (init_ray installs it again over Ray's)
    parent = None
    client = None
    try:
        cfg, overrides = _prologue(args, args.config)
        check_launch(cfg, args, [stage])
        tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
        experiment_id = tracking.setup(tracking_uri, args.experiment)
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri)
        runs = {up: getattr(args, f"{up}_run") for up in table_step(stage).upstream}
        for up, run_id in runs.items():
            tracking.require_complete(client, run_id, up)
        if args.parent:
            tracking.pipeline_run(client, args.parent, flag="--parent")
        join_cluster(args, cfg, tracking_uri)
        cfg, data_dir = ensure_data(cfg, args.config, overrides)
        if args.parent:
            parent = args.parent
        else:
            parent = tracking.start_parent(client, experiment_id, cfg,
                                           name=f"disunknown-{cfg.dataset}-{stage}")
        run_id = execute(stage, cfg, data_dir, parent, runs, args, tracking_uri, client)
        if not args.parent:
            client.set_terminated(parent, "FINISHED")
    except BaseException as exc:
        if parent is not None and not args.parent:
            tracking.mark_failed(client, parent, status=_end_status(exc))
        code = _report_failure(exc, None)
        if code is None:
            raise
        return code
    print(f"{stage} run {run_id} (pipeline run {parent})\n{tracking.ui_hint(tracking_uri)}", flush=True)
    return 0


def stage_entry(argv: list[str] | None = None) -> int:
    """``python pipelines/stage.py STAGE [options]``: :func:`stage_main` for the named stage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = [s.name for s in steps_module.STEPS if RAY in s.runners]
    if not argv or argv[0] not in steps:
        given = repr(argv[0]) if argv else "nothing"
        print(f"usage: stage.py STAGE [options]; STAGE is one of {', '.join(steps)} (got {given})",
              file=sys.stderr)
        return 2
    return stage_main(argv[0], argv[1:])


# ----------------------------------------------------------------- prepare

def _classes(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        try:
            out[name.strip()] = int(n)
        except ValueError:
            raise DataError(f"--classes {text!r}: {part.strip()!r} is not NAME=COUNT with an integer "
                            f"count, e.g. 'color=3,size=4'") from None
    return out


def parse_prepare_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prepare a data source into the versioned Parquet format "
                                            "(python pipelines/prepare_data.py SOURCE --out DIR)")
    p.add_argument("source", help="one of: " + ", ".join(sorted(__import__(
        "dsu_models.data.sources", fromlist=["SOURCES"]).SOURCES)))
    p.add_argument("--out", required=True, help="prepared directory to write")
    p.add_argument("--root", help="data root (torchvision sources, rendered_chairs, image folder)")
    p.add_argument("--path", help="dataset file (dsprites .npz, 3dshapes .h5)")
    p.add_argument("--csv", help="image_folder: label CSV (default ROOT/labels.csv)")
    p.add_argument("--file-column", help="image_folder: CSV column with file paths")
    p.add_argument("--factors", help="image_folder: comma-separated factor columns (others are errors)")
    p.add_argument("--classes", help="image_folder: declared class counts, e.g. 'color=3,size=4'")
    p.add_argument("--eval-factors", help="image_folder: comma-separated evaluation-only factor "
                                          "columns (cells may be empty; never trained on)")
    p.add_argument("--channels", type=int, help="image_folder: 1 or 3 (default: first image's)")
    p.add_argument("--download", action="store_true", help="torchvision sources: download to --root")
    p.add_argument("--no-extra", action="store_true", help="svhn: leave out extra_32x32.mat")
    p.add_argument("--relabel-orientation", action="store_true",
                   help="dsprites: relabel square/ellipse orientations (docs/method.md section 10)")
    p.add_argument("--crop", type=float, help="chairs3d: centred crop fraction")
    p.add_argument("--square", choices=SQUARE_MODES,
                   help="image_folder: make non-square images square: crop keeps the centred "
                        "square, pad pads the short side with black (default: refuse them)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-samples", type=int, help="built-in sources: a seeded subset (of the factor grid; digits: of its images)")
    p.add_argument("--test-portion", type=float)
    p.add_argument("--val-portion", type=float,
                   help="share of train held out as val, chosen by id (default 0.1; 0 = none)")
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
            "eval_factors": a.eval_factors,
            "crop": a.crop, "square": a.square, "image_size": a.image_size,
            "num_samples": a.num_samples,
            "test_portion": a.test_portion, "val_portion": a.val_portion, "seed": a.seed,
            "plot_size": a.plot_size,
            "chunk_size": a.chunk_size}
    opts = {k: v for k, v in opts.items() if v is not None}
    for flag, key, value in ((a.download, "download", True), (a.no_extra, "extra", False),
                             (a.relabel_orientation, "relabel_orientation", True),
                             (a.resize, "resize", True)):
        if flag:
            opts[key] = value
    return opts


def prepare_main(argv=None) -> int:
    from dsu_models.data import get_source, prepare
    from dsu_models.data.prepared import check_replaceable
    from pipelines.jobs.prepare import prepare_with_ray

    a = parse_prepare_args(argv)
    try:
        get_source(a.source)
        opts = options_from_args(a)
        check_replaceable(a.out, a.overwrite)  # a bad --out is refused before Ray starts
        t0 = time.time()
        if a.no_ray:
            out = prepare(a.source, a.out, overwrite=a.overwrite, **opts)
        else:
            init_ray(a.num_cpus, dashboard=False)
            out = prepare_with_ray(a.source, a.out, overwrite=a.overwrite,
                                   progress=lambda done, total: console.bar("prepare", done, total), **opts)
    except DataError as e:
        # raised in a Ray actor, it arrives wrapped with the remote traceback: say the cause only
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:     # Ctrl-C or SIGTERM: the staging folder is gone already
        print(f"stopped by {stop_reason(e)}; {a.out} is as it was", file=sys.stderr)
        return interrupt_status(e)
    from dsu_models.data import read_manifest

    m = read_manifest(out)
    rows = {s: v["rows"] for s, v in m["splits"].items()}
    print(f"{out}: {m['name']} {m['image_size']}px x{m['channels']} rows {rows} "
          f"hash {m['content_hash'][:12]} ({time.time() - t0:.1f} s)")
    for note in m.get("notes", []):   # what reading changed in the images (made in the tasks)
        print(f"note: {note}", file=sys.stderr)
    return 0

