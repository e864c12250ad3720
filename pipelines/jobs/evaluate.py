"""The pipeline's ``evaluate`` and ``register`` steps (docs/method.md section 11).

``evaluate`` runs as one Ray task (a GPU when the pipeline has ``--gpu``):

1. downloads the stage-1, stage-2 and lenc hand-offs and the code statistics
   from their MLflow runs and bundles them into the final model
   (``dsu_models.bundle.make_bundle``: E, G2, B2, S, resolved config,
   factor table with class names);
2. reads the prepared train/test splits and trains the oracles, or loads them
   from the cache under ``<storage>/oracles`` (keyed by the data's content);
3. computes the metric set of ``dsu_models.evaluation.evaluate`` and logs it to
   the ``evaluate`` run, with the pictures of ``dsu_models.plots`` (swap
   matrix, class sweeps, code scatter plots, label embeddings) and the model
   bundle as the ``model`` artifact folder.

``register`` (in the driver) logs that bundle as an MLflow pyfunc model,
registers it as ``disunknown-<dataset>`` and moves the ``champion`` alias to it
only when its ``summary`` beats the current holder's
(``pipelines.tracking.registry.log_and_register``).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from dsu_models.config import Config
from dsu_models.grids import to_hwc
from pipelines.cluster import storage
from pipelines.tracking import runs as tracking

MODEL_DIR = "model"


def _plot_split(data_dir: str, cfg: Config, test):
    """The plot split (the images every picture uses); the test split when it has none."""
    from dsu_models.data import read_split
    from dsu_models.data.errors import DataError

    try:
        return read_split(data_dir, "plot", image_size=cfg.image_size)
    except (DataError, FileNotFoundError):
        return test


def evaluate_in_process(cfg: Config, data_dir: str, runs: dict, run_id: str, tracking_uri: str,
                        device: str = "cpu", log=print) -> dict[str, float]:
    """Bundle, evaluate and log to ``run_id``; returns the metrics."""
    from mlflow.tracking import MlflowClient

    from dsu_models.data import read_split
    from dsu_models.evaluation import evaluate, load_or_train_oracles
    from dsu_models.bundle import example_rows, make_bundle, save_bundle
    from dsu_models.inference import DisUnknownModel
    from dsu_models.plots import evaluation_pictures
    from pipelines.data.upstream import load_upstream

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dsu-evaluate-") as tmp:
        workdir = Path(tmp)
        handoffs = load_upstream(runs, tracking_uri, workdir, need_codes=False,
                                 handoffs=("stage1", "stage2", "lenc"))
        stats = handoffs["code_stats"]
        train = read_split(data_dir, "train", image_size=cfg.image_size)
        test = read_split(data_dir, "test", image_size=cfg.image_size)
        by_name = {f.name: f for f in train.factors}
        bundle = make_bundle(handoffs["stage1"], handoffs["stage2"], handoffs["lenc"], stats,
                             [by_name[n] for n in cfg.labeled_factors], list(train.factors),
                             example_rows(_plot_split(data_dir, cfg, test)))
        model = DisUnknownModel(bundle, device=device)

        started = time.perf_counter()
        oracles = load_or_train_oracles(train, test, cfg.evaluate,
                                        storage.oracle_cache(storage.resolve(cfg.storage)),
                                        device=model.device, log=log)
        log(f"[evaluate] oracles ready in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in oracles.test_accuracy.items()))
        metrics = evaluate(model, train, test, cfg.evaluate, oracles, log=log)
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for name, image in evaluation_pictures(model, test, seed=cfg.evaluate.seed).items():
            client.log_image(run_id, to_hwc(image), artifact_file=f"pictures/{name}.png")
        bundle_dir = save_bundle(bundle, workdir / MODEL_DIR)
        client.log_artifacts(run_id, str(bundle_dir), artifact_path=MODEL_DIR)
        log("[evaluate] " + ", ".join(f"{k} {metrics[k]:.3f}" for k in
                                      ("swap_acc_mean", "preserve_mean", "leak_excess_mean", "recon_psnr",
                                       "frechet", "summary") if k in metrics))
        return metrics


def run_evaluate(cfg: Config, data_dir: str, runs: dict, run_id: str, tracking_uri: str,
                 use_gpu: bool = False, num_cpus: float | None = None) -> dict[str, float]:
    """:func:`evaluate_in_process` as one Ray task (on a GPU node with ``use_gpu``)
    with ``num_cpus`` CPUs (its torch threads); default: a lone Train worker's share."""
    import ray

    from pipelines.cluster.placement import default_cpus_per_worker, node_cpus

    if num_cpus is None:
        num_cpus = default_cpus_per_worker(node_cpus(), 1, use_gpu)

    @ray.remote
    def task(cfg_dict: dict) -> dict:
        from dsu_models.config import config_from_dict
        torch.set_num_threads(max(1, int(num_cpus)))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        return evaluate_in_process(config_from_dict(cfg_dict), data_dir, runs, run_id, tracking_uri,
                                   device, log=lambda m: print(m, flush=True))

    ref = task.options(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0).remote(cfg.to_dict())
    return ray.get(ref)


def run_register(cfg: Config, runs: dict, run_id: str, tracking_uri: str, alias: str = "champion") -> dict:
    """Register the evaluate run's model; returns what the registry step reports."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.registry import log_and_register

    client = MlflowClient(tracking_uri)
    evaluate_run = client.get_run(runs["evaluate"])
    summary = evaluate_run.data.metrics.get("summary")
    if summary is None:
        raise ValueError(f"evaluate run {runs['evaluate']} has no 'summary' metric")
    with tempfile.TemporaryDirectory(prefix="dsu-register-") as tmp:
        bundle_dir = tracking.download(runs["evaluate"], MODEL_DIR, tracking_uri, Path(tmp))
        return log_and_register(tracking_uri, run_id, bundle_dir, cfg.dataset, summary, alias=alias)
