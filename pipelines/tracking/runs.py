"""MLflow bookkeeping for the pipeline: stores, parent/child runs, hand-offs.

One parent run per pipeline; one nested child run per stage (tag
``dsu.stage``), holding the resolved config as params, metrics, sample grids
and the stage's outputs as artifacts. A child that finished carries
``dsu.complete = true``; ``--resume`` skips those. Stages read their inputs
only through :func:`download`, by run id, never from a path an upstream job
happened to write.

The default store is local: ``sqlite:///<home>/mlflow.db`` plus an artifact
folder, where ``<home>`` is ``$DSU_HOME`` or ``~/.disunknown`` (absolute, so
it survives ``ray job submit`` running the script in a temporary copy).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from dsu_models.config import Config, config_diff, flat_params, load_resolved, save_config
from dsu_models.grids import to_hwc

STAGE_TAG, COMPLETE_TAG, PIPELINE_TAG = "dsu.stage", "dsu.complete", "dsu.pipeline"
# A run continued with a changed config (``--resume --change-config``): the version
# its config.yaml is at and, per change, the keys that changed.
CONFIG_VERSION_TAG, CONFIG_CHANGES_TAG = "dsu.config_version", "dsu.config_changes"
VERSIONS_DIR = "config_versions"


def dsu_home() -> Path:
    return Path(os.environ.get("DSU_HOME", Path.home() / ".disunknown")).expanduser().resolve()


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (as MLflow itself reads it), else the
    local store ``sqlite:///$DSU_HOME/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = dsu_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


# MLflow's own variables for a server with a login (``mlflow server --app-name basic-auth``);
# they reach the workers through Ray's environment (pipelines.cli.join_cluster), never a
# param, tag, log line or artifact
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def login_env() -> dict[str, str]:
    """The MLflow login variables this process has."""
    return {k: os.environ[k] for k in LOGIN_ENV if os.environ.get(k)}


def check_login(tracking_uri: str):
    """For a tracking server: one request, so that a missing or wrong login fails
    here, in one line, before anything starts (ConfigError)."""
    from dsu_models.config import ConfigError

    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as exc:
        status = exc.get_http_status_code()
        if status not in (401, 403):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if status == 403:
            why = f"user {user!r} may not read its experiments (HTTP 403)"
        elif user or os.environ.get("MLFLOW_TRACKING_TOKEN"):
            why = (f"it refused the login of {'user ' + repr(user) if user else 'MLFLOW_TRACKING_TOKEN'} "
                   f"(HTTP 401): check MLFLOW_TRACKING_PASSWORD (or the token)")
        else:
            why = "it asks for a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        raise ConfigError(f"--tracking-uri {tracking_uri}: {why}") from None


def setup(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.
    Local stores get their artifacts under ``<home>/artifacts/<experiment>``."""
    uri = tracking_uri or default_tracking_uri()
    check_login(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        location = (dsu_home() / "artifacts" / experiment).as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def ui_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri}"
    return f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def log_config(client: MlflowClient, run_id: str, cfg: Config):
    """Resolved config as params (batched, MLflow takes at most 100 per call) and as a file."""
    params = [mlflow.entities.Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(save_config(cfg, Path(tmp) / "config.yaml")))


def record_config_change(client: MlflowClient, run_id: str, cfg: Config, changed: list[str]):
    """The run goes on with ``cfg``: its ``config.yaml`` artifact becomes ``cfg``
    (what a later ``--resume`` reads), the one it replaces is kept as
    ``config_versions/v<N>.yaml``, and the tags say the version and, per change,
    the keys that changed. MLflow params cannot change: they keep the values
    the run started with, and config.yaml is the config now."""
    if not changed:
        return
    tags = client.get_run(run_id).data.tags
    version = int(tags.get(CONFIG_VERSION_TAG, "1"))
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(client.download_artifacts(run_id, "config.yaml", tmp))
        kept = old.rename(old.with_name(f"v{version}.yaml"))
        client.log_artifact(run_id, str(kept), artifact_path=VERSIONS_DIR)
        client.log_artifact(run_id, str(save_config(cfg, Path(tmp) / "new" / "config.yaml")))
    history = tags.get(CONFIG_CHANGES_TAG, "")
    entry = f"v{version + 1}: {', '.join(changed)}"
    client.set_tag(run_id, CONFIG_CHANGES_TAG, ((history + "; ") if history else "") + entry)
    client.set_tag(run_id, CONFIG_VERSION_TAG, str(version + 1))


def start_parent(client: MlflowClient, experiment_id: str, cfg: Config, name: str | None = None) -> str:
    run = client.create_run(experiment_id, run_name=name or f"disunknown-{cfg.dataset}",
                            tags={PIPELINE_TAG: "true"})
    log_config(client, run.info.run_id, cfg)
    return run.info.run_id


def child_runs(client: MlflowClient, parent_id: str) -> dict[str, mlflow.entities.Run]:
    """The parent's stage runs by stage name (the newest one per stage)."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])
    return {r.data.tags[STAGE_TAG]: r for r in runs if STAGE_TAG in r.data.tags}


def stage_run(client: MlflowClient, parent_id: str, stage: str, cfg: Config) -> tuple[str, bool]:
    """(run id, complete) of the parent's run for ``stage``: an existing one is
    re-entered (resume), else a new nested run is created with the config logged."""
    existing = child_runs(client, parent_id).get(stage)
    if existing is not None:
        complete = existing.data.tags.get(COMPLETE_TAG) == "true"
        if not complete:  # re-entered: it goes on with cfg, recorded if that differs
            run_id = existing.info.run_id
            client.update_run(run_id, status="RUNNING")
            with tempfile.TemporaryDirectory() as tmp:
                logged = load_resolved(client.download_artifacts(run_id, "config.yaml", tmp))
            record_config_change(client, run_id, cfg, config_diff(logged, cfg))
        return existing.info.run_id, complete
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={"mlflow.parentRunId": parent_id, STAGE_TAG: stage,
                                  COMPLETE_TAG: "false"})
    log_config(client, run.info.run_id, cfg)
    return run.info.run_id, False


def get_run(client: MlflowClient, run_id: str, flag: str) -> mlflow.entities.Run:
    """The run ``run_id`` given by the user as ``flag``; a ValueError naming both
    when the store has no such run."""
    from mlflow.exceptions import MlflowException
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"{flag} {run_id}: no such run in {client.tracking_uri}") from None


def pipeline_run(client: MlflowClient, run_id: str, flag: str) -> mlflow.entities.Run:
    """The pipeline (parent) run ``run_id``; a ValueError naming it when the store
    has no such run or it is not a pipeline's parent run."""
    run = get_run(client, run_id, flag)
    if run.data.tags.get(PIPELINE_TAG) != "true":
        what = f"a {run.data.tags[STAGE_TAG]!r} stage run" if STAGE_TAG in run.data.tags else "not a pipeline run"
        raise ValueError(f"{flag} {run_id}: {what}; pass the id printed as 'pipeline run ...'")
    return run


def logged_config(run_id: str, tracking_uri: str, dst: str | Path) -> Path:
    """The resolved config a run logged (``config.yaml``), downloaded into ``dst``."""
    return download(run_id, "config.yaml", tracking_uri, dst)


def mark_failed(client: MlflowClient, *run_ids: str | None, status: str = "FAILED"):
    """End runs that did not finish (FAILED, or KILLED for an interrupt); best effort:
    the store may be what failed."""
    for run_id in run_ids:
        if run_id:
            try:
                client.set_terminated(run_id, status)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass


def mark_complete(client: MlflowClient, run_id: str):
    client.set_tag(run_id, COMPLETE_TAG, "true")
    client.set_terminated(run_id, "FINISHED")


def download(run_id: str, artifact_path: str, tracking_uri: str, dst: str | Path) -> Path:
    """One upstream artifact (file or folder) by run id into ``dst``."""
    mlflow.set_tracking_uri(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dst)))


def require_complete(client: MlflowClient, run_id: str, stage: str):
    """An upstream run id given by the user must be a finished run of ``stage``."""
    run = get_run(client, run_id, f"--{stage}-run")
    tags = run.data.tags
    if tags.get(STAGE_TAG) != stage:
        raise ValueError(f"run {run_id} is a {tags.get(STAGE_TAG, 'non-stage')!r} run, not {stage!r}")
    if tags.get(COMPLETE_TAG) != "true":
        raise ValueError(f"run {run_id} ({stage}) has not finished; resume its pipeline first")


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int):
    """One batch of metrics at ``step`` (an iteration)."""
    import time

    from mlflow.entities import Metric
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()])


def log_pictures(client: MlflowClient, run_id: str, images: dict, step: int, prefix: str):
    """uint8 (C, H, W) pictures as MLflow image history ``<prefix>_<key>`` at ``step``."""
    for key, image in images.items():
        client.log_image(run_id, to_hwc(image), key=f"{prefix}_{key}", step=int(step))
