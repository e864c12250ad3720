"""One Ray Tune trial: a stage trained in-process and judged as it goes (docs/method.md sections 7, 8, 11).

A function trainable (:func:`run_trial`), one per sampled configuration:

- **Config**: the sweep's base config (a user-level YAML in the sweep folder)
  with the trial's sampled values layered on as overrides, resolved by
  ``dsu_models.config.load_config``.
- **Training**: the stage module runs in this process on the plain in-memory
  loader (``BatchSource``), like the single-process runner. Stage 2 reuses the
  finished stage 1, classifier and distilled codes the driver loaded once
  (``ctx["upstream"]``); codes are joined to images by id.
- **Reports**: every ``report_every`` iterations (and at the end) the trial
  judges the stage as a model on the validation split (the sweep chooses, so it
  never reads test): stage 1 by ``evaluate_stage1`` -> ``val_stage1_objective``;
  stage 2 by ``evaluate`` with the oracles the driver cached -> ``val_summary``
  (every judged metric is named ``val_<metric>``). It then reports
  ``{iteration, objective, losses, metrics}`` to Tune with a checkpoint of the full stage state, so ASHA can
  stop it and a resumed sweep continues it from that iteration.
- **Tracking**: each trial is a nested MLflow run under the sweep run (tag
  ``dsu.tune.trial``), found again on resume: sampled values (``sampled.*``)
  and the resolved config as params, metrics with ``step = iteration``, the
  sample grids at each report. Only this process and the driver talk to MLflow.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from dsu_models.allocator import retain_freed_memory
from dsu_models.batches import BatchSource, labeled_view
from dsu_models.config import Config
from dsu_models.config import load_config
from dsu_models.data.configured import load_data
from dsu_models.stages import make_stage, stage_class
from dsu_models.files import load_torch, save_torch
from dsu_models.loop import Cadence, Sink, run_stage
from pipelines.data.stage_inputs import lookup_codes
from pipelines.jobs.worker import STATE_FILE
from pipelines.sweeps.judge import Judge
from pipelines.sweeps.space import Space
from pipelines.tracking import runs as tracking

TRIAL_TAG, SWEEP_TAG = "dsu.tune.trial", "dsu.tune.sweep"
BASE_FILE, BEST_FILE = "base_config.yaml", "best_config.yaml"  # in the sweep folder
RESUMED_TAG = "dsu.tune.resumed_from"


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default spells out every sampled value)."""
    return trial.trial_id


def base_config_file(ctx: dict) -> str:
    """The sweep's base config as a file on this node: the record folder's
    when this node sees it, else a copy of the text the driver shipped."""
    if Path(ctx["base_config"]).is_file():
        return ctx["base_config"]
    import hashlib

    from dsu_models.files import write_text
    digest = hashlib.sha256(ctx["base_text"].encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"dsu-sweep-{ctx['sweep_name']}-{digest}" / BASE_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, ctx["base_text"])
    return str(path)


def trial_config(base_config: str, sampled: dict) -> Config:
    """The resolved config of one trial: base YAML + sampled values."""
    return load_config(base_config, Space.overrides(sampled))


# ----------------------------------------------------------------- MLflow


def trial_run(client, ctx: dict, trial_id: str, sampled: dict, cfg: Config) -> str:
    """The trial's nested run under the sweep run: re-entered on resume, else created
    with the sampled values and the resolved config as params."""
    sweep = client.get_run(ctx["sweep_run_id"])
    found = client.search_runs([sweep.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{ctx['sweep_run_id']}' "
                                             f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(sweep.info.experiment_id, run_name=trial_id,
                            tags={"mlflow.parentRunId": ctx["sweep_run_id"], TRIAL_TAG: trial_id,
                                  SWEEP_TAG: ctx["sweep_name"]})
    from mlflow.entities import Param
    client.log_batch(run.info.run_id, params=[Param(f"sampled.{k}", str(v)[:6000])
                                              for k, v in Space.plain(sampled).items()])
    tracking.log_config(client, run.info.run_id, cfg)
    return run.info.run_id


# ----------------------------------------------------------------- data


def stage_sources(ctx: dict, cfg: Config, train, test) -> tuple[BatchSource, dict]:
    """Training batches and the fixed plot batch (with the distilled codes for a
    stage that reads them)."""
    batch_size = getattr(cfg, ctx["stage"]).batch_size
    codes = {"train": None, "test": None}
    if stage_class(ctx["stage"]).reads_codes:
        distilled = ctx["upstream"]["codes"]
        for split, data in (("train", train), ("test", test)):
            if distilled is None:  # no unknown code: nothing was distilled
                mu = sigma = torch.zeros(len(data), 0)
            else:
                mu, sigma = lookup_codes(distilled[split], data.ids)
            codes[split] = {"mu": mu, "sigma": sigma}
    source = BatchSource(cfg, train, batch_size, cfg.seed, codes["train"])
    plot_batch = BatchSource(cfg, test, min(8, len(test)), cfg.seed, codes["test"]).batch(0)
    return source, plot_batch


def _device(ctx: dict) -> torch.device:
    import ray
    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------- trainable


def run_trial(sampled: dict, ctx: dict):
    """Tune function trainable. ``sampled``: ``{dotted key: value}``; ``ctx``: the
    sweep's fixed settings (``pipelines.sweeps.driver.make_context``), shared through ``tune.with_parameters``."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per checkpoint otherwise
    torch.set_num_threads(ctx["threads"])
    retain_freed_memory()
    cfg = trial_config(base_config_file(ctx), sampled)
    device = _device(ctx)
    train, val, test = load_data(cfg)
    _, factors = labeled_view(cfg, train)
    torch.manual_seed(cfg.seed)
    stage = make_stage(ctx["stage"], cfg, factors, ctx.get("upstream") or {}, device)
    source, plot_batch = stage_sources(ctx, cfg, train, test)
    judge = Judge(ctx, cfg, train, val, test, factors, device)

    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(ctx["tracking_uri"])
    run_id = trial_run(client, ctx, trial_id, sampled, cfg)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:  # CPU: the RNG state must stay a CPU tensor
            stage.load_state_dict(load_torch(Path(d) / STATE_FILE))
        client.set_tag(run_id, RESUMED_TAG, str(stage.iteration))

    sink = TrialSink(judge, client, run_id, plot_batch)
    run_stage(stage, source.batch, sink, Cadence(ctx["report_every"], ctx["report_every"]))
    client.set_terminated(run_id, "FINISHED")


def run_trainer_trial(sampled: dict, ctx: dict):
    """Tune function trainable that launches the stage's ``TorchTrainer``
    (``pipelines.jobs.stage_train.fit_stage``: ``ctx["train_workers"]`` workers
    streaming the prepared data from Ray Data, GPUs with ``gpus_per_trial``),
    every report judged by rank 0 and forwarded to Tune by
    ``TuneReportCallback``, so ASHA stops it like an in-process trial. Its Ray
    Train run lives under the sweep folder, named by the trial's MLflow run, so a
    resumed sweep's trial continues from its last checkpoint."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.jobs.stage_train import fit_stage

    every, name = ctx["report_every"], ctx["stage"]
    cfg = load_config(base_config_file(ctx), Space.overrides(sampled) + [
        f"data_path={ctx['data_dir']}", f"{name}.report_interval={every}",
        f"{name}.checkpoint_interval={every}"])
    client = MlflowClient(ctx["tracking_uri"])
    run_id = trial_run(client, ctx, tune.get_context().get_trial_id(), sampled, cfg)
    fit_stage(name, cfg, ctx["data_dir"], run_id, ctx["upstream_runs"], ctx["tracking_uri"],
              workers=ctx["train_workers"], use_gpu=ctx["use_gpu"], cpus_per_worker=ctx["cpus_per_worker"],
              max_failures=ctx["max_failures"],
              storage_path=ctx["trainer_storage"], callbacks=[TuneReportCallback()],
              judge={"oracle_cache": ctx["oracle_cache"]})
    client.set_terminated(run_id, "FINISHED")


class TrialSink(Sink):
    """Each report: the mean losses (``<term>``, the names the pipeline's stage runs log) and
    the judge's metrics of the stage so far (``val_<metric>``), to MLflow at ``step =
    iteration`` with the sample grids, then to Tune with a checkpoint of the full stage
    state, so ASHA can stop the trial and a resumed sweep continues it."""

    def __init__(self, judge: "Judge", client, run_id: str, plot_batch: dict):
        self.judge, self.client, self.run_id, self.plot_batch = judge, client, run_id, plot_batch

    def report(self, stage, losses, images_per_s, checkpoint):
        from ray import tune

        it = stage.iteration
        metrics = dict(losses)
        metrics.update(self.judge(stage))
        tracking.log_metrics(self.client, self.run_id, metrics, it)
        # the last grids logged are the trial's final ones, also for a trial ASHA stopped
        tracking.log_pictures(self.client, self.run_id, stage.sample_images(self.plot_batch), it, stage.name)
        # Saved after judging, so a resumed trial's random stream matches an uninterrupted one.
        with tempfile.TemporaryDirectory(prefix="dsu-tune-ckpt-") as d:
            save_torch(stage.state_dict(), Path(d) / STATE_FILE)
            tune.report({"iteration": it, **metrics}, checkpoint=tune.Checkpoint.from_directory(d))
