"""One training stage as a Ray Train job (``TorchTrainer``, data parallel).

The stage modules of ``dsu_models.stages`` do the math; this file adds:

- **Data**: each worker reads its share of the prepared dataset through
  ``ray.train.get_dataset_shard("train")``, with epochs repeated and
  reshuffled; the per-worker batch is ``batch_size / workers`` so the global
  batch matches the config. Stage 2 joins the distilled codes to images by ``id``.
- **Gradients**: one all-reduce per iteration. A stage iteration runs one
  backward pass over several losses; instead of DDP wrapping (which would hook
  every backward of every wrapped module) :func:`allreduce_gradients` averages
  all gradients in one flat buffer between the backward pass and the optimizer
  steps (``Stage.grad_sync``); parameters are broadcast from rank 0 at start.
- **Checkpoints**: every ``checkpoint_interval`` rank 0 reports the full stage
  state with ``ray.train.report``; with ``FailureConfig(max_failures)`` a dead
  worker restarts the group from that state and the iteration count continues.
- **Tracking**: rank 0 logs metrics and pictures (the stage's ``pictures``:
  sample grids, class sweeps, code scatter and embedding plots, each at its
  interval) to the stage's MLflow run and, at the end, the hand-off (weights +
  config) as the ``handoff.pt`` artifact. Every rank reports to Ray Train.

Upstream inputs come only from MLflow artifacts, downloaded by run id on each
worker (:func:`load_upstream`), so stages can run on different nodes.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from dsu_models.config import Config, config_from_dict
from dsu_models.data.base import FactorInfo, InMemoryDataset, to_float
from dsu_models.plots import SCATTER_POINTS
from dsu_models.train import make_stage
from pipelines import tracking

HANDOFF = "handoff.pt"
STATE_FILE = "state.pt"


# ----------------------------------------------------------------- gradients


def allreduce_gradients(stage) -> None:
    """Average every trainable parameter's gradient over the workers, in one
    flat all-reduce. Parameters without a gradient this step are skipped (the
    same ones on every rank: all ranks run the same code path)."""
    params = [p for p in stage.trainable_parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_state(stage) -> None:
    """Rank 0's parameters and buffers to every rank (identical start)."""
    for module in stage.models.values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


# ----------------------------------------------------------------- upstream


def load_codes(directory: Path) -> dict:
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


def load_upstream(runs: dict, tracking_uri: str, workdir: Path, need_codes: bool,
                  handoffs: tuple[str, ...] = ("stage1", "classifier", "stage2")) -> dict:
    """The ``handoffs`` of upstream runs (None where ``runs`` has no such run), the
    code statistics (``code_stats``) and, with ``need_codes``, stage 2's codes."""
    def handoff(key):
        if not runs.get(key):
            return None
        path = tracking.download(runs[key], HANDOFF, tracking_uri, workdir / key)
        return torch.load(path, map_location="cpu", weights_only=True)

    out: dict = {key: handoff(key) for key in handoffs}
    out.update(code_stats=None, codes=None)
    if runs.get("distill"):
        stats = tracking.download(runs["distill"], "stats.pt", tracking_uri, workdir / "distill")
        out["code_stats"] = torch.load(stats, map_location="cpu", weights_only=True)
        if need_codes:
            codes_dir = tracking.download(runs["distill"], "codes", tracking_uri, workdir / "distill")
            out["codes"] = {split: load_codes(codes_dir / split) if (codes_dir / split).exists() else None
                            for split in ("train", "test")}
    return out


# ----------------------------------------------------------------- worker


def _batch_from(row_batch: dict, label_columns: list[int], codes: dict | None, unknown_size: int) -> dict:
    batch = {"image": row_batch["image"], "labels": row_batch["labels"][:, label_columns]}
    if codes is not None:
        batch["mu"], batch["sigma"] = lookup_codes(codes, row_batch["id"])
    elif unknown_size == 0:
        n = row_batch["image"].shape[0]
        batch["mu"] = batch["sigma"] = torch.zeros(n, 0)
    return batch


def _save_state(stage, directory: Path):
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(stage.state_dict(), tmp)
    os.replace(tmp, directory / STATE_FILE)


def say(line: str):
    """One line on the worker's stdout, which Ray shows on the driver's console.
    Not ``print``: Ray Train patches it in its workers to log through the root
    logger *and* echo to the wrapped stdout, so every line reached the console twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop(config: dict):
    """Ray Train worker: runs one stage to the end. ``config`` is built by :func:`run_stage`.
    Downloads, checkpoints and the hand-off are written under a work directory
    that is removed when the stage ends (Ray has copied what it keeps by then).
    Its name is fixed per run and rank, so the attempt that replaces a killed
    worker (whose own clean-up never ran) removes what that one left."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    workdir = worker_dir(config["stage"], config["run_id"], rank)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        _train_in(config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def worker_dir(stage: str, run_id: str, rank: int) -> Path:
    """The work directory of ``rank``'s worker of ``stage`` in MLflow run ``run_id``."""
    return Path(tempfile.gettempdir()) / f"dsu-{stage}-{run_id}-rank{rank}"


def _train_in(config: dict, workdir: Path):
    import ray.train
    import ray.train.torch
    from mlflow.tracking import MlflowClient

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg: Config = config_from_dict(config["cfg"])
    name = config["stage"]
    scfg = getattr(cfg, name)
    device = ray.train.torch.get_device()
    factors = [FactorInfo.from_dict(d) for d in config["factors"]]
    upstream = load_upstream(config["upstream"], config["tracking_uri"], workdir,
                             need_codes=name == "stage2")
    torch.manual_seed(cfg.seed)
    stage = make_stage(name, cfg, factors, upstream, device)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        stage.load_state_dict(state, restore_random=False)
        if rank == 0:
            say(f"[{name}] resuming from iteration {stage.iteration}")
    # Different noise per rank; deterministic given the iteration we start from.
    torch.manual_seed(cfg.seed * 7919 + rank * 104729 + stage.iteration)
    if world > 1:
        broadcast_state(stage)
        stage.grad_sync = allreduce_gradients

    codes = upstream["codes"]["train"] if upstream.get("codes") else None
    plot_codes = upstream["codes"]["test"] if upstream.get("codes") else None
    plot = config["plot"]
    plot_batch = _batch_from({"image": to_float(plot["images"][:8]), "labels": plot["labels"][:8],
                              "id": plot["ids"][:8]}, config["label_columns"], plot_codes, cfg.unknown_size)
    plot_set = InMemoryDataset(plot["images"], plot["labels"],
                               [FactorInfo.from_dict(d) for d in config["all_factors"]], plot["ids"])
    client = MlflowClient(config["tracking_uri"]) if rank == 0 else None
    run_id = config["run_id"]
    fail_at, marker = config.get("fail_at"), config.get("fail_marker")

    from pipelines.data_loading import iter_epochs
    shard = ray.train.get_dataset_shard("train")
    per_worker = scfg.batch_size // world
    sums, count, last_time, last_it = {}, 0, time.perf_counter(), stage.iteration
    batches = iter_epochs(shard, per_worker, seed=cfg.seed * 31 + rank, device="cpu",
                          cache=config["cache"])
    while not stage.done:
        _, rows = next(batches)
        if fail_at is not None and stage.iteration == fail_at and rank == world - 1 \
                and not Path(marker).exists():
            Path(marker).write_text("failed once")
            if config.get("fail_kill"):   # die as a killed process does: no clean-up runs
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"test hook: simulated worker failure at iteration {fail_at}")
        metrics = stage.train_step(_batch_from(rows, config["label_columns"], codes, cfg.unknown_size))
        if rank == 0:
            _log_pictures(client, run_id, stage, plot_batch, plot_set)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        it = stage.iteration
        if it % scfg.report_interval and it % scfg.checkpoint_interval and not stage.done:
            continue
        now = time.perf_counter()
        mean = {k: v / count for k, v in sums.items()}
        mean["images_per_s"] = (it - last_it) * scfg.batch_size / max(now - last_time, 1e-9)
        sums, count, last_time, last_it = {}, 0, now, it
        ckpt_dir = None
        if rank == 0:
            say(f"[{name}] {it}/{scfg.iterations} | "
                + " ".join(f"{k} {v:.4g}" for k, v in mean.items()))
            client.log_batch(run_id, metrics=[_metric(k, v, it) for k, v in mean.items()])
            if it % scfg.checkpoint_interval == 0 or stage.done:
                ckpt_dir = Path(tempfile.mkdtemp(prefix="dsu-ckpt-", dir=workdir))
                _save_state(stage, ckpt_dir)
        report = {"iteration": it, **mean}
        if ckpt_dir is not None:
            # the default (synchronous) upload has copied it to storage on return
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        else:
            ray.train.report(report)
    if rank == 0:
        path = workdir / HANDOFF
        handoff = stage.handoff()
        handoff["upstream_runs"] = {k: v for k, v in config["upstream"].items() if v}
        torch.save(handoff, path)
        client.log_artifact(run_id, str(path))


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric
    return Metric(key, float(value), int(time.time() * 1000), step)


def _log_pictures(client, run_id: str, stage, plot_batch: dict, plot_set: InMemoryDataset):
    """Log what ``stage.pictures`` says is due after its current iteration (rank 0
    only) as MLflow image history ``<stage>_<key>`` at that step."""
    if not hasattr(stage, "pictures"):
        return
    for key, image in stage.pictures(plot_batch, plot_set).items():
        array = image.permute(1, 2, 0).numpy()
        client.log_image(run_id, array[..., 0] if array.shape[2] == 1 else array,
                         key=f"{stage.name}_{key}", step=stage.iteration)


# ----------------------------------------------------------------- driver


def plot_rows(data_dir: str, cfg: Config, n: int = 8) -> dict:
    """Up to ``n`` plot-split images (uint8), their labels (all factors) and ids."""
    from dsu_models.data import read_split
    plot = read_split(data_dir, "plot", image_size=cfg.image_size)
    n = min(n, len(plot))
    return {"images": plot.images[:n].clone(), "labels": plot.labels[:n].clone(),
            "ids": plot.ids[:n].clone()}


def labeled_infos(manifest: dict, cfg: Config) -> tuple[list[dict], list[int]]:
    """Labeled factors' infos (train frequencies) and their column indices, config order."""
    names = [f["name"] for f in manifest["factors"]]
    columns = [names.index(n) for n in cfg.labeled_factors]
    infos = []
    for j in columns:
        f = manifest["factors"][j]
        infos.append(FactorInfo(f["name"], int(f["classes"]), tuple(f["class_names"]),
                                tuple(f["frequencies"]["train"])).to_dict())
    return infos, columns


def default_cpus_per_worker(nodes: list[float], workers: int, use_gpu: bool = False) -> float:
    """Logical CPUs per Train worker (its torch threads: the integer part), given
    the CPUs of each node (``nodes``). One per GPU worker. On CPU, the largest share that
    places every worker on some node and leaves one CPU free on a node for Ray
    Data's decoding (none free: the job starves, see RAY_NOTES): on one node, all
    its CPUs but one shared out; on a cluster, never more than a node holds."""
    if use_gpu:
        return 1
    even = (sum(nodes) - 1) / workers
    whole = range(int(max(nodes, default=1)), 0, -1)
    for share in sorted({even, *whole}, reverse=True):
        if share >= 0.5 and _fits(nodes, workers, share):
            return share
    return 0.5


def node_cpus() -> list[float]:
    """The CPUs of each live node of the Ray cluster this process is connected to."""
    import ray
    return [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]


def _fits(nodes: list[float], workers: int, share: float) -> bool:
    """Whether ``workers`` workers of ``share`` CPUs each fit on the nodes, the
    largest first, with a whole CPU left over on at least one node."""
    left, spare = workers, False
    for cpus in sorted(nodes, reverse=True):
        placed = min(left, int(cpus / share + 1e-9))
        left -= placed
        spare = spare or cpus - placed * share >= 1 - 1e-9
    return left == 0 and spare


def run_stage(stage: str, cfg: Config, data_dir: str, run_id: str, upstream: dict,
              tracking_uri: str, workers: int = 1, use_gpu: bool = False,
              cpus_per_worker: float | None = None, max_failures: int = 2,
              storage_path: str | None = None, test_hooks: dict | None = None):
    """Fit the stage as a TorchTrainer; resumes from the latest checkpoint of the
    same MLflow run (the Ray run name is the run id). Returns the Ray Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dsu_models.data import read_manifest
    from dsu_models.data.manifest import factor_infos
    from pipelines.data_loading import shard_fits_in_memory, train_dataset

    scfg = getattr(cfg, stage)
    if scfg.batch_size % workers:
        raise ValueError(f"{stage}.batch_size {scfg.batch_size} is not divisible by {workers} workers")
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(node_cpus(), workers, use_gpu)
    manifest = read_manifest(data_dir)
    infos, columns = labeled_infos(manifest, cfg)
    all_factors = [f.to_dict() for f in factor_infos(manifest)]
    loop_config = {
        "stage": stage, "cfg": cfg.to_dict(), "factors": infos, "label_columns": columns,
        "upstream": upstream, "tracking_uri": tracking_uri, "run_id": run_id,
        "threads": max(1, int(cpus_per_worker)),
        "cache": shard_fits_in_memory(manifest, "train", cfg.image_size, workers, cfg.worker_cache_mb),
        # the first 8 rows are the sample batch, all of them the code-scatter set
        "plot": plot_rows(data_dir, cfg, n=SCATTER_POINTS), "all_factors": all_factors,
        **(test_hooks or {}),
    }
    storage = storage_path or str(tracking.dsu_home() / "ray_results")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(storage_path=storage, name=f"{stage}-{run_id}",
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
        datasets={"train": train_dataset(data_dir, "train", cfg.image_size)},
    )
    return trainer.fit()
