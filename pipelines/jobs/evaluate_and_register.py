"""The pipeline's ``evaluate`` and ``register`` steps (docs/method.md section 11).

``evaluate`` runs as one Ray task (a GPU when the pipeline has ``--gpu``):

1. downloads the stage-1, stage-2 and lenc hand-offs and the code statistics
   from their MLflow runs and bundles them into the final model
   (``dsu_models.bundle.make_bundle``: E, G2, B2, S, resolved config,
   factor table with class names);
2. reads the prepared train/val/test splits and trains the oracles, or loads
   them from the cache under ``<storage>/oracles`` (keyed by the data's content);
3. computes the metric set of ``dsu_models.evaluation.evaluate`` on the
   validation split (what choices read: ``val_<metric>``) and on the test split
   (the figures a run reports: ``test_<metric>``) and logs both to the
   ``evaluate`` run, with the pictures of ``dsu_models.plots`` drawn on test
   (swap matrix, class sweeps, code scatter plots, label embeddings, a swap
   confusion matrix per labeled factor, the round trips that ended farthest
   from their content) and the model bundle as the ``model`` artifact folder.

``register`` (in the driver) logs that bundle as an MLflow pyfunc model,
registers it as ``disunknown-<dataset>`` and moves the ``champion`` alias to it
only when it meets the champion bar on val (``evaluate.champion_*``) and its
``val_summary`` beats the current holder's
(``pipelines.tracking.registry.log_and_register``).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from dsu_models.config import Config
from dsu_models.evaluation.metrics import SPLITS, from_split, on_split, split_key
from dsu_models.grids import to_hwc
from pipelines.cluster import storage
from pipelines.tracking import runs as tracking

MODEL_DIR = "model"


def _validation_split(data_dir: str, cfg: Config, log):
    """The validation split, or None (with a line saying what follows) for data prepared
    with ``val_portion=0``: nothing can then be chosen without reading test."""
    from dsu_models.data import read_split
    from dsu_models.data.errors import DataError

    try:
        return read_split(data_dir, "val", image_size=cfg.image_size)
    except DataError as e:
        log(f"[evaluate] {e}: figures on test only, and no version can earn the champion alias")
        return None


def _plot_split(data_dir: str, cfg: Config, test):
    """The plot split (the images every picture uses); the test split when it has none."""
    from dsu_models.data import read_split
    from dsu_models.data.errors import DataError

    try:
        return read_split(data_dir, "plot", image_size=cfg.image_size)
    except (DataError, FileNotFoundError):
        return test


PHASES = 4  # oracles, val, test, pictures and the bundle: the evaluation's progress bar


def evaluate_in_process(cfg: Config, data_dir: str, runs: dict, run_id: str, tracking_uri: str,
                        device: str = "cpu", log=print, bar=None) -> dict[str, float]:
    """Bundle, evaluate and log to ``run_id``; returns the metrics. ``bar(done,
    total)`` is told after each of its :data:`PHASES`."""
    bar = bar or (lambda done, total: None)
    from mlflow.tracking import MlflowClient

    from dsu_models.data import read_split
    from dsu_models.evaluation import evaluate_in_full, load_or_train_oracles
    from dsu_models.bundle import example_rows, make_bundle, save_bundle
    from dsu_models.inference import DisUnknownModel
    from pipelines.data.stage_inputs import load_upstream

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dsu-evaluate-") as tmp:
        workdir = Path(tmp)
        handoffs = load_upstream(runs, tracking_uri, workdir, need_codes=False)
        stats = handoffs["code_stats"]
        train, test = (read_split(data_dir, split, image_size=cfg.image_size) for split in ("train", "test"))
        val = _validation_split(data_dir, cfg, log)
        by_name = {f.name: f for f in train.factors}
        bundle = make_bundle(handoffs["stage1"], handoffs["stage2"], handoffs["lenc"], stats,
                             [by_name[n] for n in cfg.labeled_factors], list(train.factors),
                             example_rows(_plot_split(data_dir, cfg, test)))
        model = DisUnknownModel(bundle, device=device)

        started = time.perf_counter()
        oracles = load_or_train_oracles(train, test, cfg.evaluate,
                                        storage.oracle_cache(storage.resolve_root(cfg.storage)),
                                        device=model.device, log=log)
        log(f"[evaluate] oracles ready in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in oracles.test_accuracy.items()))
        bar(1, PHASES)
        on_val = evaluate_in_full(model, train, val, cfg.evaluate, oracles, log=None) if val else None
        bar(2, PHASES)
        on_test = evaluate_in_full(model, train, test, cfg.evaluate, oracles, log=None)
        bar(3, PHASES)
        metrics = split_metrics(on_val.metrics if on_val else {}, on_test.metrics)
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for name, image in picture_set(model, test, on_test, cfg.evaluate.seed).items():
            client.log_image(run_id, to_hwc(image), artifact_file=f"pictures/{name}.png")
        bundle_dir = save_bundle(bundle, workdir / MODEL_DIR)
        client.log_artifacts(run_id, str(bundle_dir), artifact_path=MODEL_DIR)
        bar(4, PHASES)
        for split in SPLITS:
            named = from_split(split, metrics)
            log(f"[evaluate] {split}: " + ", ".join(f"{k} {named[k]:.3f}" for k in HEADLINE if k in named))
        return metrics


HEADLINE = ("swap_acc_mean", "preserve_mean", "content_consistency", "leak_excess_mean", "recon_psnr",
            "frechet", "summary")


def split_metrics(on_val: dict, on_test: dict) -> dict[str, float]:
    """One evaluation on each split under distinct names: ``val_<metric>``, ``test_<metric>``."""
    return {**on_split("val", on_val), **on_split("test", on_test)}


def picture_set(model, test, evaluation, seed: int) -> dict:
    """The evaluation's pictures (``dsu_models.plots``): the usual set, a swap confusion matrix
    per labeled factor and the round trips that ended farthest from their content."""
    from dsu_models.plots import confusion_picture, evaluation_pictures, worst_consistency_picture

    pictures = evaluation_pictures(model, test, seed=seed)
    infos = {f.name: f for f in test.factors}
    for name, counts in evaluation.confusion.items():
        pictures[f"confusion_{name}"] = confusion_picture(counts, infos[name])
    if len(evaluation.worst.distance):
        pictures["consistency_worst"] = worst_consistency_picture(evaluation.worst)
    return pictures


def run_evaluate(cfg: Config, data_dir: str, runs: dict, run_id: str, tracking_uri: str,
                 use_gpu: bool = False, num_cpus: float | None = None, reporter=None) -> dict[str, float]:
    """:func:`evaluate_in_process` as one Ray task (on a GPU node with ``use_gpu``)
    with ``num_cpus`` CPUs (its torch threads); default: a lone Train worker's share.
    Its lines and progress go to ``reporter`` (``pipelines.console``; None: the task's stdout)."""
    from pipelines.console import Reporter

    reporter = reporter or Reporter()
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
                                   device, log=reporter.line,
                                   bar=lambda done, total: reporter.bar("evaluate", done, total))

    ref = task.options(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0).remote(cfg.to_dict())
    return ray.get(ref)


def run_register(cfg: Config, runs: dict, run_id: str, tracking_uri: str, alias: str = "champion") -> dict:
    """Register the evaluate run's model, judged on its validation metrics; returns what
    the registry step reports."""
    from mlflow.tracking import MlflowClient

    from dsu_models.evaluation.metrics import champion_failures
    from pipelines.tracking.registry import log_and_register

    client = MlflowClient(tracking_uri)
    evaluate_run = client.get_run(runs["evaluate"])
    logged = evaluate_run.data.metrics
    on_val = from_split("val", logged)
    if "summary" in on_val:
        failures = champion_failures(on_val, cfg.evaluate)
    elif split_key("test", "summary") in logged:
        on_val["summary"] = math.nan
        failures = ["the data has no validation split (prepared with val_portion=0)"]
    else:
        raise ValueError(f"evaluate run {runs['evaluate']} has no 'val_summary' metric")
    with tempfile.TemporaryDirectory(prefix="dsu-register-") as tmp:
        bundle_dir = tracking.download(runs["evaluate"], MODEL_DIR, tracking_uri, Path(tmp))
        return log_and_register(tracking_uri, run_id, bundle_dir, cfg.dataset, on_val["summary"], alias=alias,
                                bar_failures=failures)
