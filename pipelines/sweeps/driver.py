"""Ray Tune sweeps of the loss weights, tracked in MLflow (docs/method.md sections 7, 8, 11).

    python pipelines/tune.py --space tune_spaces/stage1.yaml --samples 16 --config quick
    python pipelines/tune.py --space tune_spaces/stage2.yaml --samples 16 --pipeline-run PARENT_RUN_ID
    python pipelines/tune.py --space tune_spaces/stage2.yaml --samples 8 --runner-dir DIR
    python pipelines/tune.py --resume SWEEP_RUN_ID          # or the sweep folder

Each trial trains one stage in-process (``pipelines/sweeps/trial.py``) and
reports the stage's objective every ``--report-every`` iterations; ASHA stops
poor trials early. Stage-1 sweeps maximise ``val_stage1_objective``, stage-2
sweeps ``val_summary``, both judged on the validation split (oracles trained once
here, before the trials).

Before any Ray work: the space file (schema, keys against the config), the
base config, every sampler's end values through config resolution, the data,
and for stage 2 the upstream runs and their config. Then:

- MLflow: one sweep run (tag ``dsu.tune.sweep``), each trial a nested run.
  At the end the sweep run records the best trial (tags ``best.<key>``,
  metric ``best_<objective>``; params ``best.<key>`` once every trial has
  finished) and logs ``best_config.yaml``.
- Files under ``<storage>/tune/<name>/`` (``pipelines.cluster.storage``): Tune's experiment (trial
  checkpoints), ``sweep.json`` (how to resume), ``space.yaml``,
  ``base_config.yaml`` and ``best_config.yaml``. The last is a user-level
  config (layered keys): ``pipelines/full.py --config best_config.yaml``.
  The base is ``--config`` plus the overrides; a stage-2 sweep without
  ``--config`` starts from the config stage 1 was trained with (resolved, as
  the runs record it), so its best config spells out resolved keys too.
- ``--resume`` restores the Tuner: finished trials stay finished, unfinished
  and errored ones continue from their last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from dsu_models.config import Config, ConfigError, layered_dict, read_yaml
from dsu_models.data import DataError
from dsu_models.config import load_config, config_path
from dsu_models.data.configured import load_data
from dsu_models.files import write_text
from pipelines.tracking import runs as tracking
from pipelines.sweeps import reused_stages
from pipelines.cli import check_data, overrides_of
from pipelines.cluster import storage
from pipelines.cluster.ray_init import init_ray
from pipelines.sweeps.space import Space, load_space
from pipelines.sweeps.trial import BASE_FILE, SWEEP_TAG, run_trainer_trial, run_trial, trial_dirname

PATH_TAG = "dsu.tune.path"
SWEEP_FILE, SPACE_FILE = "sweep.json", "space.yaml"


# a trainer-backed trial's own share (Tune refuses zero); its workers take --cpus-per-trial each
TRIAL_DRIVER_CPU = 0.01


def tune_root(root: str) -> Path:
    """The sweep records' folder: ``<storage>/tune``, or for a URI storage
    ``$DSU_HOME/tune`` on the driver, mirrored to ``<storage>/tune`` (Tune's
    own state and the trials' Ray Train runs are written there directly)."""
    if storage.has_scheme(root):
        from pipelines.tracking.runs import dsu_home
        return dsu_home() / "tune"
    return Path(storage.join(root, "tune"))


def tune_storage(sweep: dict) -> str:
    """Where Tune keeps the sweep's state and the trials theirs (``<storage>/tune``;
    sweeps recorded before this key: their folder's parent)."""
    return sweep.get("tune_storage") or str(Path(sweep["folder"]).parent)


def absolute_uri(uri: str | None) -> str:
    """Trials run with another working directory: a relative SQLite path is made absolute."""
    uri = uri or tracking.default_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


# ----------------------------------------------------------------- arguments


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Ray Tune sweep of one stage's loss weights, tracked in MLflow")
    p.add_argument("--space", help="search space YAML (tune_spaces/stage1.yaml, tune_spaces/stage2.yaml)")
    p.add_argument("--samples", type=int, default=8, help="trials (grid entries multiply it)")
    p.add_argument("--config", help="YAML file or preset name (quick, tiny); stage 1 default: quick, "
                                    "stage 2 default: the upstream stage 1's config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. stage1.iterations=2000")
    p.add_argument("--dataset", help="dataset name (same as dataset=NAME)")
    p.add_argument("--data", help="prepared dataset directory (same as data_path=DIR)")
    p.add_argument("--storage", metavar="URI",
                   help="storage every node reaches (same as storage=URI; default $DSU_STORAGE, "
                        "else $DSU_HOME); sweeps live in its tune/ folder")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs of an in-process trial, or of each Train worker with --train-workers")
    p.add_argument("--train-workers", type=int, default=0, metavar="N",
                   help="each trial launches the stage's TorchTrainer with N workers (Ray Data "
                        "streaming, a GPU each with --gpus-per-trial > 0); 0: trials train in-process")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as resources allow)")
    p.add_argument("--report-every", type=int, default=200, help="iterations between reports (and checkpoints)")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: iterations before a trial can be stopped (default: --report-every)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the top 1/rf at each rung")
    p.add_argument("--max-failures", type=int, default=0, help="retries of a crashed trial from its checkpoint")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random search")
    p.add_argument("--name", help="sweep name (folder under <storage>/tune); default <stage>-<time>")
    p.add_argument("--experiment", default="disunknown-tune")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store; default $MLFLOW_TRACKING_URI, else sqlite:///$DSU_HOME/mlflow.db (~/.disunknown)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--resume", metavar="SWEEP",
                   help="continue a sweep: its MLflow run id or its folder (every other setting "
                        "comes from the sweep's sweep.json)")
    up = p.add_argument_group("stage-2 sweeps: the finished stage 1 to reuse")
    up.add_argument("--pipeline-run", help="pipeline (parent) run id: its stage1, distill, classifier runs")
    for stage in reused_stages.NEEDED:
        up.add_argument(f"--{stage}-run", help=f"{stage} run id (overrides the pipeline's)")
    up.add_argument("--runner-dir", help="output folder of python -m dsu_models.train")
    return p


# ----------------------------------------------------------------- new sweep


def upstream_spec(args, client) -> dict | None:
    if args.runner_dir:
        return {"kind": "runner", "dir": str(Path(args.runner_dir).resolve())}
    named = {s: getattr(args, f"{s}_run") for s in reused_stages.NEEDED}
    if not args.pipeline_run and not any(named.values()):
        raise ValueError("a stage-2 sweep needs a finished stage 1: --pipeline-run, --stage1-run/"
                         "--distill-run/--classifier-run, or --runner-dir")
    return {"kind": "mlflow", "runs": reused_stages.pipeline_runs(client, args.pipeline_run, named)}


def base_dict(args, space: Space, upstream: dict | None) -> dict:
    """The sweep's base config, user level: the config file (or stage 1's for a
    stage-2 sweep without one) layered with the command-line overrides."""
    overrides = overrides_of(args)
    if args.config:
        user = read_yaml(config_path(args.config), "config file")
    elif upstream is not None:
        user = dict(upstream["stage1"]["config"])
    else:
        user = read_yaml(config_path("quick"), "config file") if not overrides else {}
    base = layered_dict(user, overrides)
    if upstream is not None and not base.get("data_path") and upstream["stage1"]["config"].get("data_path"):
        base["data_path"] = upstream["stage1"]["config"]["data_path"]  # the data stage 1 saw
    return base


def validate(space: Space, base: dict, upstream: dict | None) -> Config:
    """Everything that can be checked before Ray: returns the base config."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_text(Path(tmp) / BASE_FILE, yaml.safe_dump(base, sort_keys=False))
        cfg = load_config(str(path), [])
        space.validate(lambda overrides: load_config(str(path), overrides))
    if upstream is not None:
        reused_stages.check_compatible(cfg, upstream)
    check_data(cfg)
    if space.stage == "stage2" and not cfg.labeled_factors and cfg.unknown_size == 0:
        raise ConfigError("stage-2 sweep: nothing to train (no labeled factors and no unknown code)")
    return cfg


def new_sweep(args) -> dict:
    """Check, then create the sweep folder and MLflow run; returns the sweep record."""
    from mlflow.tracking import MlflowClient

    space = load_space(args.space)
    if args.samples < 1 or args.report_every < 1:
        raise ValueError("--samples and --report-every must be at least 1")
    clash = [o.split("=", 1)[0].strip() for o in overrides_of(args)]
    clash = [k for k in clash if k in space.keys]
    if clash:
        raise ConfigError(f"{', '.join(clash)}: both swept (search space {space.path}) and overridden")
    if args.train_workers < 0:
        raise ValueError(f"--train-workers {args.train_workers}: 0 (in-process trials) or more")
    if args.train_workers and args.runner_dir:
        raise ValueError("--train-workers: trainer-backed trials read stage 1 from MLflow runs "
                         "(--pipeline-run or --stage1-run...), not from --runner-dir")
    tracking_uri = absolute_uri(args.tracking_uri)
    client = MlflowClient(tracking_uri)
    spec, upstream = None, None
    if space.stage == "stage2":
        spec = upstream_spec(args, client)
        with tempfile.TemporaryDirectory() as tmp:
            upstream = reused_stages.load_reused(spec, tracking_uri, Path(tmp))
    base = base_dict(args, space, upstream)
    cfg = validate(space, base, upstream)
    return create_sweep(args, space, cfg, base, spec, client)


def create_sweep(args, space: Space, cfg: Config, base: dict, spec: dict | None, client) -> dict:
    """The sweep folder (space, base config, ``sweep.json``) and its MLflow run."""
    tracking_uri = absolute_uri(args.tracking_uri)
    name = args.name or f"{space.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage.resolve_root(cfg.storage)
    folder = tune_root(root) / name
    if folder.exists():
        raise ValueError(f"sweep folder {folder} exists: --resume it or pick another --name")
    folder.mkdir(parents=True)
    write_text(folder / SPACE_FILE, space.path.read_text())  # later edits don't change a resume
    write_text(folder / BASE_FILE, yaml.safe_dump(base, sort_keys=False))
    total = getattr(cfg, space.stage).iterations
    sweep = {
        "name": name, "folder": str(folder), "stage": space.stage, "objective": space.objective,
        # where Tune keeps its state and the trials theirs; a URI storage gets the record mirrored
        "tune_storage": storage.join(root, "tune"),
        "mirror": storage.join(root, "tune", name) if storage.has_scheme(root) else None,
        "space_source": str(space.path), "tracking_uri": tracking_uri, "experiment": args.experiment,
        "samples": args.samples, "iterations": total, "report_every": min(args.report_every, total),
        "grace_period": min(args.grace_period or args.report_every, total),
        "reduction_factor": args.reduction_factor, "max_concurrent": args.max_concurrent,
        "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
        "max_failures": args.max_failures, "search_seed": args.search_seed, "upstream": spec,
        "oracle_cache": str(storage.oracle_cache(root)), "storage": root,
        "train_workers": args.train_workers,
    }
    experiment_id = tracking.setup(tracking_uri, args.experiment)
    run = client.create_run(experiment_id, run_name=f"tune-{name}",
                            tags={SWEEP_TAG: name, PATH_TAG: str(folder), "dsu.tune.stage": space.stage})
    sweep["sweep_run_id"] = run.info.run_id
    from mlflow.entities import Param
    keep = ("stage", "objective", "samples", "iterations", "report_every", "grace_period",
            "reduction_factor", "max_concurrent", "cpus_per_trial", "gpus_per_trial", "search_seed")
    client.log_batch(run.info.run_id, params=[Param(f"tune.{k}", str(sweep[k])) for k in keep]
                     + [Param("tune.space", str(space.path)), Param("tune.upstream", json.dumps(spec))])
    tracking.log_config(client, run.info.run_id, cfg)
    client.log_artifact(run.info.run_id, str(folder / SPACE_FILE))
    client.log_artifact(run.info.run_id, str(folder / BASE_FILE))
    write_text(folder / SWEEP_FILE, json.dumps(sweep, indent=1))  # last: the folder is now resumable
    storage.mirror(folder, sweep["mirror"])
    return sweep


def reopen_sweep(target: str, tracking_uri: str | None) -> dict:
    """The sweep record of a folder, or of an MLflow sweep run id."""
    folder = Path(target)
    if not folder.is_dir():
        from mlflow.tracking import MlflowClient
        client = MlflowClient(absolute_uri(tracking_uri))
        tags = client.get_run(target).data.tags
        if PATH_TAG not in tags:
            raise ValueError(f"--resume {target}: run is not a sweep run (no {PATH_TAG} tag)")
        folder = Path(tags[PATH_TAG])
    if not (folder / SWEEP_FILE).exists():
        raise ValueError(f"--resume {target}: {folder / SWEEP_FILE} is missing (not a sweep folder)")
    return json.loads((folder / SWEEP_FILE).read_text())


# ----------------------------------------------------------------- Tune


def make_context(sweep: dict) -> dict:
    """What every trial needs, shipped once through the object store. Stage 2:
    the upstream hand-offs and codes (in-process trials; trainer-backed ones
    download them in their workers), and the oracles trained now (cached).
    Trainer-backed trials: the prepared data (a built-in dataset is prepared
    under the storage now) and where their Ray Train runs live."""
    folder = Path(sweep["folder"])
    # the trials get the base config's text: they may run where the record folder is not
    ctx = {"stage": sweep["stage"], "base_config": str(folder / BASE_FILE),
           "base_text": (folder / BASE_FILE).read_text(),
           "tracking_uri": sweep["tracking_uri"], "sweep_run_id": sweep["sweep_run_id"],
           "sweep_name": sweep["name"], "report_every": sweep["report_every"],
           "threads": max(1, int(sweep["cpus_per_trial"])),
           "oracle_cache": sweep["oracle_cache"], "train_workers": sweep.get("train_workers", 0)}
    cfg = load_config(ctx["base_config"], [])
    if ctx["train_workers"]:
        from pipelines.cli import ensure_data
        _, ctx["data_dir"] = ensure_data(cfg, ctx["base_config"], [])
        ctx.update(use_gpu=sweep["gpus_per_trial"] > 0, max_failures=sweep["max_failures"],
                   cpus_per_worker=sweep["cpus_per_trial"],
                   trainer_storage=storage.join(tune_storage(sweep), sweep["name"], "trainers"),
                   upstream_runs=(sweep["upstream"] or {}).get("runs", {}))
    if sweep["stage"] == "stage2":
        if not ctx["train_workers"]:
            with tempfile.TemporaryDirectory() as tmp:
                ctx["upstream"] = reused_stages.load_reused(sweep["upstream"], sweep["tracking_uri"], Path(tmp))
        from dsu_models.evaluation import load_or_train_oracles
        train, val, test = load_data(cfg)
        print(f"[tune] oracles for {cfg.dataset} (cached in {ctx['oracle_cache']})", flush=True)
        load_or_train_oracles(train, test, cfg.evaluate, ctx["oracle_cache"],
                              log=lambda m: print(f"[oracles] {m}", flush=True))
    return ctx


def make_tuner(sweep: dict, ctx: dict, space: Space, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.sweeps.report import SweepProgress

    # A snapshot per checkpoint is what resuming needs; Tune warns about it at every report.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ctx["train_workers"]:  # the trial only drives its TorchTrainer, whose workers hold the resources
        trainable = tune.with_resources(tune.with_parameters(run_trainer_trial, ctx=ctx),
                                        {"cpu": TRIAL_DRIVER_CPU})
    else:
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                        {"cpu": sweep["cpus_per_trial"], "gpu": sweep["gpus_per_trial"]})
    experiment = storage.join(tune_storage(sweep), sweep["name"])
    if restore and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="iteration", max_t=sweep["iterations"],
                              grace_period=sweep["grace_period"], reduction_factor=sweep["reduction_factor"])
    return tune.Tuner(
        trainable, param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=sweep["objective"], mode="max", num_samples=sweep["samples"], scheduler=scheduler,
            max_concurrent_trials=sweep["max_concurrent"], trial_dirname_creator=trial_dirname,
            search_alg=BasicVariantGenerator(random_state=sweep["search_seed"])),
        run_config=tune.RunConfig(
            name=sweep["name"], storage_path=tune_storage(sweep), verbose=0,
            callbacks=[SweepProgress(sweep)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=sweep["max_failures"])))


def run_sweep(sweep: dict, num_cpus: int | None, restore: bool) -> int:
    from mlflow.tracking import MlflowClient

    from pipelines.sweeps.report import summarise

    client = MlflowClient(sweep["tracking_uri"])
    client.update_run(sweep["sweep_run_id"], status="RUNNING")
    space = load_space(Path(sweep["folder"]) / SPACE_FILE)
    ray = init_ray(num_cpus)
    storage.check_reachable(sweep.get("storage") or str(Path(sweep["folder"]).parents[1]),
                            sweep["tracking_uri"], ray,
                            grows=storage.cluster_grows(bool(os.environ.get("RAY_ADDRESS"))))
    ctx = make_context(sweep)
    print(f"[tune] sweep {sweep['name']}: MLflow run {sweep['sweep_run_id']}, folder {sweep['folder']}",
          flush=True)
    results = make_tuner(sweep, ctx, space, restore).fit()
    return summarise(sweep, results, client)


def main(argv: list[str] | None = None) -> int:
    args = sweep_parser().parse_intermixed_args(argv)
    try:
        if args.resume:
            sweep = reopen_sweep(args.resume, args.tracking_uri)
            restore = True
        else:
            if not args.space:
                raise ValueError("--space is required (or --resume a sweep)")
            sweep = new_sweep(args)
            restore = False
        return run_sweep(sweep, args.num_cpus, restore)
    except (ConfigError, DataError, ValueError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

