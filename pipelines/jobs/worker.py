"""The Ray Train worker of a training stage: the one stage loop
(``dsu_models.loop``) fed by this worker's Ray Data shard, with a sink that
reports to Ray Train and (rank 0) logs to MLflow.

- **Data**: each worker reads its share of the prepared dataset through
  ``ray.train.get_dataset_shard("train")``, epochs repeated and reshuffled;
  the per-worker batch is ``batch_size / workers`` so the global batch matches
  the config. Stage 2 joins the distilled codes to images by ``id``.
- **Gradients**: with several workers, ``Stage.grad_sync`` is one flat
  all-reduce per iteration of the gradients and the loss values
  (``pipelines.cluster.collective``), and ``Stage.batch_reduce`` makes the
  batch-statistic losses see the global batch (a sum that carries gradients);
  rank 0's weights are broadcast at start. A loss that is non-finite on any
  rank is non-finite in the average, so every rank stops in that iteration and
  the stage fails once with that error (no retry from the checkpoint).
- **Checkpoints**: at each checkpoint iteration rank 0 reports the full stage
  state with ``ray.train.report``; after a worker dies the group restarts
  from it (``FailureConfig``) and the iteration count continues. A group
  restarts from the newest checkpoint in the run's storage folder that loads,
  which may be newer than the one Ray Train hands back: Ray registers a
  checkpoint only once its controller has collected every rank's report, so
  a node that dies right after a checkpoint was written would otherwise cost
  the work since the one before (or the whole stage).
- **Console**: rank 0's progress lines go to the driver's console through the
  ``Reporter`` the driver hands over (``pipelines.console``), or to its stdout.
- **Tracking**: rank 0 logs metrics and pictures to the stage's MLflow run and,
  at the end, the hand-off (weights + config) as the ``handoff.pt`` artifact.
  Every rank reports to Ray Train.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dsu_models.allocator import retain_freed_memory
from dsu_models.config import Config, config_from_dict
from dsu_models.data.base import FactorInfo, InMemoryDataset, to_float
from dsu_models.stages import make_stage, stage_class
from dsu_models.files import load_torch, save_torch
from dsu_models.loop import Sink, run_stage
from dsu_models.stages.common import NonFiniteLossError
from pipelines.cluster import storage
from pipelines.console import Reporter
from pipelines.cluster.collective import allreduce_gradients, broadcast_state, sum_over_workers
from pipelines.data.stage_inputs import HANDOFF, load_upstream, lookup_codes
from pipelines.tracking import runs as tracking

STATE_FILE = "state.pt"


def worker_dir(stage: str, run_id: str, rank: int) -> Path:
    """The work directory of ``rank``'s worker of ``stage`` in MLflow run ``run_id``."""
    return Path(tempfile.gettempdir()) / f"dsu-{stage}-{run_id}-rank{rank}"


def train_loop(config: dict):
    """Ray Train worker: runs one stage to the end. ``config`` is built by
    ``pipelines.jobs.stage_train.fit_stage``. Downloads, checkpoints and the
    hand-off are written under a work directory that is removed when the stage
    ends (Ray has copied what it keeps by then). Its name is fixed per run and
    rank, so the attempt that replaces a killed worker (whose own clean-up
    never ran) removes what that one left."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    workdir = worker_dir(config["stage"], config["run_id"], rank)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        return _train_in(config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def batch_from(row_batch: dict, label_columns: list[int], codes: dict | None, unknown_size: int) -> dict:
    """A stage batch from a Ray Data batch: labeled columns, codes joined by id."""
    batch = {"image": row_batch["image"], "labels": row_batch["labels"][:, label_columns]}
    if codes is not None:
        batch["mu"], batch["sigma"] = lookup_codes(codes, row_batch["id"])
    elif unknown_size == 0:
        n = row_batch["image"].shape[0]
        batch["mu"] = batch["sigma"] = torch.zeros(n, 0)
    return batch


class TrainSink(Sink):
    """Every rank reports to Ray Train; rank 0 also prints, logs to MLflow and
    attaches the checkpoint."""

    def __init__(self, rank: int, client, run_id: str, workdir: Path, judge=None, reporter=None,
                 curves=None):
        self.rank, self.client, self.run_id, self.workdir = rank, client, run_id, workdir
        self.judge = judge  # a Tune trial's: rank 0's reports carry the model's metrics
        self.reporter = reporter or Reporter()
        self.curves = curves  # rank 0's validation curves (pipelines.jobs.curves), or None

    def pictures(self, stage, images):  # only rank 0 is given a plot batch
        tracking.log_pictures(self.client, self.run_id, images, stage.iteration, stage.name)

    def report(self, stage, losses, images_per_s, checkpoint):
        import ray.train

        it = stage.iteration
        metrics = {**losses, "images_per_s": images_per_s}
        if self.rank != 0:
            ray.train.report({"iteration": it, **metrics})
            return
        self.reporter.progress(stage.name, it, stage.scfg.iterations, stage.scfg.batch_size, losses,
                               images_per_s)
        if self.judge is not None:
            metrics.update(self.judge(stage))
        tracking.log_metrics(self.client, self.run_id, metrics, it)
        if self.curves is not None:
            self.curves.maybe(stage)  # a task beside the workers: training goes on
        if not checkpoint:
            ray.train.report({"iteration": it, **metrics})
            return
        folder = Path(tempfile.mkdtemp(prefix="dsu-ckpt-", dir=self.workdir))
        save_torch(stage.state_dict(), folder / STATE_FILE)
        # the default (synchronous) upload has copied it to storage on return
        ray.train.report({"iteration": it, **metrics},
                         checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)


def newest_state(run_folder: str, workdir: Path, device) -> dict | None:
    """The stage state of the newest ``checkpoint_*`` folder under the run's
    storage folder (a path or URI) whose state file loads; ``None`` when there
    is none. Every rank sees the same files (no group is writing when one
    starts), so every rank picks the same one. A copy cut short by a dead node
    fails to load and the one before it is taken."""
    import pyarrow.fs as pafs

    from dsu_models.files import CheckpointError

    fs, root = storage.filesystem(run_folder)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    folders = sorted((e.path for e in entries if e.type == pafs.FileType.Directory
                      and e.base_name.startswith("checkpoint_")), reverse=True)
    for folder in folders:
        local = workdir / "resume" / Path(folder).name
        try:
            local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{folder}/{STATE_FILE}", str(local / STATE_FILE),
                            source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return load_torch(local / STATE_FILE, map_location=device)
        except (OSError, CheckpointError):  # missing (FileNotFoundError) or cut short
            continue
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return None


def _train_in(config: dict, workdir: Path):
    import ray.train
    import ray.train.torch
    from mlflow.tracking import MlflowClient

    from pipelines.data.loading import iter_epochs

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    retain_freed_memory()
    cfg: Config = config_from_dict(config["cfg"])
    name = config["stage"]
    device = ray.train.torch.get_device()
    factors = [FactorInfo.from_dict(d) for d in config["factors"]]
    upstream = load_upstream(config["upstream"], config["tracking_uri"], workdir,
                             need_codes=stage_class(name).reads_codes)
    torch.manual_seed(cfg.seed)
    stage = make_stage(name, cfg, factors, upstream, device)

    state = newest_state(config["run_folder"], workdir, device)
    checkpoint = ray.train.get_checkpoint()
    if state is None and checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_torch(Path(d) / STATE_FILE, map_location=device)
    if state is not None:
        stage.load_state_dict(state, restore_random=False)
        if rank == 0:
            (config.get("reporter") or Reporter()).line(f"[{name}] resuming from iteration {stage.iteration}")
    # Different noise per rank; deterministic given the iteration we start from.
    torch.manual_seed(cfg.seed * 7919 + rank * 104729 + stage.iteration)
    if world > 1:
        broadcast_state(stage)
        stage.grad_sync = allreduce_gradients
        stage.batch_reduce = sum_over_workers

    codes = upstream["codes"] or {}
    plot = config["plot"]
    plot_batch = batch_from({"image": to_float(plot["images"][:8]), "labels": plot["labels"][:8],
                             "id": plot["ids"][:8]}, config["label_columns"], codes.get("test"),
                            cfg.unknown_size)
    plot_set = InMemoryDataset(plot["images"], plot["labels"],
                               [FactorInfo.from_dict(d) for d in config["all_factors"]], plot["ids"])
    client = MlflowClient(config["tracking_uri"]) if rank == 0 else None

    per_worker = getattr(cfg, name).batch_size // world
    epochs = iter_epochs(ray.train.get_dataset_shard("train"), per_worker, seed=cfg.seed * 31 + rank,
                         device="cpu", cache=config["cache"], raw=stage.device.type == "cuda")

    def next_batch(_iteration: int) -> dict:
        _, rows = next(epochs)
        return batch_from(rows, config["label_columns"], codes.get("train"), cfg.unknown_size)

    judge = None
    if rank == 0 and config.get("judge"):  # a trainer-backed Tune trial (pipelines.sweeps.trial)
        from dsu_models.data.configured import load_data
        from pipelines.sweeps.judge import Judge
        train, val, test = load_data(cfg)
        judge = Judge({"stage": name, "upstream": upstream, **config["judge"]}, cfg, train, val,
                      test, factors, device)
    curves = None
    if rank == 0 and cfg.evaluate.curve_interval and not config.get("judge"):
        from pipelines.jobs.curves import Curves
        curves = Curves(cfg, name, upstream, config["factors"],
                        str(storage.oracle_cache(storage.resolve_root(cfg.storage))), config["run_id"],
                        config["tracking_uri"], config.get("reporter"))
    sink = TrainSink(rank, client, config["run_id"], workdir, judge, config.get("reporter"), curves)
    try:
        run_stage(stage, next_batch, sink, plot_batch=plot_batch if rank == 0 else None, plot_set=plot_set)
    except NonFiniteLossError as exc:
        # every rank sees the same averaged losses, so all stop here together;
        # returned, not raised: a retry from the checkpoint would only repeat it
        return {"non_finite": [exc.stage, exc.iteration, exc.term, exc.value]}
    if rank == 0:
        if curves is not None:
            curves.wait()  # the curves are complete before the stage's run is
        path = workdir / HANDOFF
        handoff = stage.handoff()
        handoff["upstream_runs"] = {k: v for k, v in config["upstream"].items() if v}
        save_torch(handoff, path)
        client.log_artifact(config["run_id"], str(path))
