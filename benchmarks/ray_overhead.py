"""Stage-1 images/s under Ray Train (1 worker, 2 threads) vs the single-process runner.

    python benchmarks/ray_overhead.py [--iterations 300] [--image-size 32] [--samples 6000]
                                      [--rounds 1]

Same machine, same run, same config (built-in shapes3d, default architecture
for the size, batch 64). The single-process figure is the plain loop over
in-memory batches; the Ray figure is what the Ray Train worker reports while
streaming the prepared Parquet through Ray Data, once streaming every epoch
(``worker_cache_mb=0``) and once with the default worker cache (epochs after
the first served from the worker's memory).

Both are timed over the same report windows (``iterations / 12`` iterations,
the first window excluded: start-up and warm-up), and a rate is the median
window, so a burst of load from other tenants of a shared machine moves it
little. The single-process loop runs before, between and after the Ray
variants; each Ray variant is compared with the mean of the two single-process
runs beside it; with ``--rounds R`` every variant runs R times and the median
overhead is printed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch


def stage_and_source(cfg):
    """Stage 1 and a plain in-memory batch source for ``cfg``: the single-process loop."""
    from dsu_models.batches import BatchSource, labeled_view
    from dsu_models.data import load_builtin
    from dsu_models.stages.stage1 import Stage1

    train, _, _ = load_builtin(cfg.dataset, image_size=cfg.image_size, num_samples=cfg.num_samples,
                               seed=cfg.seed)
    train = train.with_measured_frequencies()
    _, factors = labeled_view(cfg, train)
    torch.manual_seed(0)
    return Stage1(cfg, factors, torch.device("cpu")), BatchSource(cfg, train, cfg.stage1.batch_size, 0)


def single_process(cfg, iterations: int, window: int) -> float:
    """Median images/s over windows of ``window`` iterations, the first one excluded."""
    stage, source = stage_and_source(cfg)
    rates, start = [], time.perf_counter()
    for i in range(iterations):
        stage.train_step(source.batch(i))
        if (i + 1) % window == 0:
            now = time.perf_counter()
            rates.append(window * cfg.stage1.batch_size / (now - start))
            start = now
    return statistics.median(rates[1:])


def under_ray(cfg, overrides: list[str], extra: list[str]) -> float:
    """Median images/s the Ray Train worker reports for stage 1 with ``extra``
    overrides, on a Ray instance started for this run and shut down after it
    (so the single-process runs beside it share the machine with no Ray)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import runs as tracking
    from pipelines.cli import builtin_dir, builtin_options
    from pipelines.jobs.prepare import prepare_with_ray
    from pipelines.jobs.stage_train import fit_stage
    from dsu_models.config import load_config

    from pipelines.cluster.ray_init import init_ray, pipeline_cpus

    # started as the pipelines start a local Ray: one logical CPU more than the
    # cores (3 on 2 cores: 2 for the worker's threads, 1 for Ray Data decoding)
    ray = init_ray(pipeline_cpus())
    try:
        data_dir = builtin_dir(cfg)
        prepare_with_ray(cfg.dataset, data_dir, **builtin_options(cfg))  # reused after the first
        uri = tracking.default_tracking_uri()
        exp = tracking.setup(uri, "ray-overhead")
        client = MlflowClient(uri)
        cfg = load_config(None, overrides + extra + [f"data_path={data_dir}"])
        parent = tracking.start_parent(client, exp, cfg)
        run_id, _ = tracking.stage_run(client, parent, "stage1", cfg)
        fit_stage("stage1", cfg, str(data_dir), run_id, {}, uri, workers=1, cpus_per_worker=2)
        rates = [m.value for m in sorted(client.get_metric_history(run_id, "images_per_s"),
                                         key=lambda m: m.step)]
        if len(rates) < 2:
            raise RuntimeError("too few reports: raise --iterations")
        return statistics.median(rates[1:])
    finally:
        ray.shutdown()


def windows_on_request(conn, cfg, window: int, warmup: int = 10):
    """Runs the single-process loop one window of ``window`` iterations per "go"
    received on ``conn``, answering each with its images/s, until "stop"."""
    torch.set_num_threads(2)
    stage, source = stage_and_source(cfg)
    i = 0
    for i in range(warmup):
        stage.train_step(source.batch(i))
    conn.send("ready")
    while conn.recv() == "go":
        start = time.perf_counter()
        for i in range(i + 1, i + 1 + window):
            stage.train_step(source.batch(i))
        conn.send(window * cfg.stage1.batch_size / (time.perf_counter() - start))


def _plain_process(conn, cfg_dict: dict, window: int):
    from dsu_models.config import config_from_dict
    windows_on_request(conn, config_from_dict(cfg_dict), window)


def _train_worker(config: dict):
    from multiprocessing.connection import Client

    from dsu_models.config import config_from_dict
    conn = Client(("127.0.0.1", config["port"]), authkey=config["key"])
    windows_on_request(conn, config_from_dict(config["cfg"]), config["window"])


def paired(cfg, rounds: int, window: int):
    """The same loop in a Ray Train worker (1 worker, 2 threads) and in a plain
    process, taking turns window by window so that a shared machine's drift hits
    both alike; then the plain process again once Ray is shut down. Separates the
    Train worker's own cost from what Ray's other processes cost everyone."""
    import multiprocessing as mp
    import secrets
    import threading
    from multiprocessing.connection import Listener

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster.ray_init import init_ray, pipeline_cpus

    ctx = mp.get_context("spawn")
    plain, child = ctx.Pipe()
    process = ctx.Process(target=_plain_process, args=(child, cfg.to_dict(), window))
    process.start()
    assert plain.recv() == "ready"

    def run(conn, n):
        out = []
        for _ in range(n):
            conn.send("go")
            out.append(conn.recv())
        return out

    alone = run(plain, rounds)
    key = secrets.token_bytes(16)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    ray = init_ray(pipeline_cpus())
    storage = tempfile.mkdtemp(prefix="dsu-bench-train-")
    trainer = TorchTrainer(
        _train_worker, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
        train_loop_config={"port": listener.address[1], "key": key, "window": window,
                           "cfg": cfg.to_dict()},
        run_config=RunConfig(storage_path=storage, name="paired"))
    fit = threading.Thread(target=trainer.fit, daemon=True)
    fit.start()
    worker = listener.accept()
    assert worker.recv() == "ready"
    with_ray, in_worker = [], []
    for _ in range(rounds):
        with_ray += run(plain, 1)
        in_worker += run(worker, 1)
    worker.send("stop")
    fit.join()
    listener.close()
    ray.shutdown()
    shutil.rmtree(storage, ignore_errors=True)
    after = run(plain, rounds)
    plain.send("stop")
    process.join()
    med = statistics.median
    print(f"plain process, no Ray: {med(alone):.1f} img/s before, {med(after):.1f} after")
    print(f"plain process while a Ray Train job runs: {med(with_ray):.1f} img/s")
    print(f"Ray Train worker, turn about with it: {med(in_worker):.1f} img/s")
    ratio = med([w / p for w, p in zip(in_worker, with_ray)])
    print(f"Train worker / plain process, paired windows: {ratio:.3f}")
    print(f"plain process with Ray's processes around / without: "
          f"{2 * med(with_ray) / (med(alone) + med(after)):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every variant; the overhead printed is the median round's")
    parser.add_argument("--paired", type=int, default=0, metavar="WINDOWS",
                        help="instead: the Train worker and a plain process taking turns, "
                             "WINDOWS windows each (see paired())")
    args = parser.parse_args()
    home = None
    if "DSU_HOME" not in os.environ:   # prepared data and MLflow store for this run only
        home = os.environ["DSU_HOME"] = tempfile.mkdtemp(prefix="dsu-bench-")
    try:
        measure(args)
    finally:
        if home:
            shutil.rmtree(home, ignore_errors=True)


def measure(args):
    from dsu_models.config import load_config
    report = max(args.iterations // 12, 1)
    overrides = ["labeled_factors=[floor_hue, wall_hue, object_hue, shape]",
                 f"image_size={args.image_size}", f"num_samples={args.samples}",
                 f"stage1.iterations={args.iterations}", f"stage1.report_interval={report}",
                 f"stage1.checkpoint_interval={args.iterations}",
                 f"stage1.sample_interval={args.iterations}"]
    cfg = load_config(None, overrides)
    torch.set_num_threads(2)
    if args.paired:
        paired(cfg, args.paired, report)
        return

    def single() -> float:
        rate = single_process(cfg, args.iterations, report)
        print(f"single process: {rate:.1f} img/s", flush=True)
        return rate

    # a shared machine's load drifts: each Ray run is bracketed by single-process runs
    variants = {"streaming every epoch": ["worker_cache_mb=0"],
                "epochs after the first from memory": []}
    before, results = single(), {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, extra in variants.items():
            rate = under_ray(cfg, overrides, extra)
            print(f"Ray Train (1 worker, 2 threads), {name}: {rate:.1f} img/s", flush=True)
            after = single()
            results[name].append(100 * (1 - 2 * rate / (before + after)))
            before = after
    for name, overheads in results.items():
        print(f"overhead, {name}: {statistics.median(overheads):.1f}% (rounds: "
              + ", ".join(f"{o:.1f}%" for o in overheads)
              + ") vs the single-process runs beside each (target <= 10%)")


if __name__ == "__main__":
    main()
