"""The driver side of one training stage: a Ray Train job (``TorchTrainer``,
data parallel) whose workers run ``pipelines.jobs.worker.train_loop``.

The trainer gets the prepared dataset's train split as a Ray Data dataset
(sharded over the workers), the stage's resolved config, the upstream MLflow
run ids (workers download their inputs from MLflow, so they can run on any
node), a few plot-split rows for pictures, and ``FailureConfig(max_failures)``:
a worker that dies restarts the group from the last checkpoint.
"""
from __future__ import annotations

from dsu_models.config import Config, ConfigError
from dsu_models.data.base import FactorInfo
from dsu_models.plots import SCATTER_POINTS
from dsu_models.stages.common import NonFiniteLossError
from pipelines.cluster.placement import default_cpus_per_worker, node_cpus
from pipelines.jobs.worker import train_loop
from pipelines.cluster import storage


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


def check_batch_split(cfg: Config, stage: str, workers: int):
    """Each worker takes an equal share of a batch: ``stage``'s batch size must divide by ``workers``."""
    batch = getattr(cfg, stage).batch_size
    if batch % workers:
        raise ConfigError(f"{stage}.batch_size {batch} is not divisible by --workers {workers} "
                          f"(each worker takes an equal share of a batch)")


def fit_stage(stage: str, cfg: Config, data_dir: str, run_id: str, upstream: dict,
              tracking_uri: str, workers: int = 1, use_gpu: bool = False,
              cpus_per_worker: float | None = None, max_failures: int = 2,
              storage_path: str | None = None, callbacks: list | None = None,
              judge: dict | None = None, reporter=None):
    """Fit the stage as a TorchTrainer; resumes from the latest checkpoint of the
    same MLflow run (the Ray run name is the run id). Returns the Ray Result.
    ``callbacks``: Ray Train callbacks (a Tune trial's ``TuneReportCallback``);
    ``judge``: ``{"oracle_cache": ...}`` makes rank 0 add the model's metrics
    (``pipelines.sweeps.judge.Judge``) to every report; ``reporter``: where
    rank 0's progress lines go (``pipelines.console``; None: its stdout)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dsu_models.data import read_manifest
    from dsu_models.data.manifest import factor_infos
    from pipelines.data.loading import cluster_cached, shard_fits_in_memory, train_dataset

    check_batch_split(cfg, stage, workers)
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(node_cpus(), workers, use_gpu)
    manifest = read_manifest(data_dir)
    infos, columns = labeled_infos(manifest, cfg)
    all_factors = [f.to_dict() for f in factor_infos(manifest)]
    storage_path = storage_path or storage.join(storage.resolve_root(cfg.storage), "ray_results")
    ray_run = f"{stage}-{run_id}"
    loop_config = {
        "stage": stage, "cfg": cfg.to_dict(), "factors": infos, "label_columns": columns,
        "upstream": upstream, "tracking_uri": tracking_uri, "run_id": run_id,
        "threads": max(1, int(cpus_per_worker)),
        "cache": shard_fits_in_memory(manifest, "train", cfg.image_size, workers, cfg.worker_cache_mb),
        # the first 8 rows are the sample batch, all of them the code-scatter set
        "plot": plot_rows(data_dir, cfg, n=SCATTER_POINTS), "all_factors": all_factors,
        "judge": judge, "run_folder": storage.join(storage_path, ray_run),
        "reporter": reporter,  # pipelines.console.Reporter: rank 0's lines to the driver's console
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(storage_path=storage_path, name=ray_run,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=callbacks),
        datasets={"train": cluster_cached(train_dataset(data_dir, "train", cfg.image_size), manifest,
                                          "train", cfg.image_size, cfg.cluster_cache_mb)},
    )
    result = trainer.fit()
    stopped = result.return_value if isinstance(result.return_value, dict) else {}
    if "non_finite" in stopped:
        raise NonFiniteLossError(*stopped["non_finite"])
    return result
