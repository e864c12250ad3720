"""Stage-1 images/s under Ray Train (1 worker, 2 threads) vs the single-process runner.

    python benchmarks/ray_overhead.py [--iterations 300] [--image-size 32] [--samples 6000]

Same machine, same run, same config (built-in shapes3d, default architecture
for the size, batch 64). The single-process figure is the plain loop over
in-memory batches; the Ray figure is what the Ray Train worker reports while
streaming the prepared Parquet through Ray Data (first report excluded:
start-up and warm-up), once streaming every epoch (``worker_cache_mb=0``)
and once with the default worker cache (epochs after the first served from
the worker's memory). Prints the rates and the overheads.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def single_process(cfg, iterations: int, warmup: int) -> float:
    from dsu_models.batches import BatchSource, labeled_view
    from dsu_models.data import load_builtin
    from dsu_models.stages.stage1 import Stage1

    train, _ = load_builtin(cfg.dataset, image_size=cfg.image_size, num_samples=cfg.num_samples,
                            seed=cfg.seed)
    train = train.with_measured_frequencies()
    _, factors = labeled_view(cfg, train)
    torch.manual_seed(0)
    stage = Stage1(cfg, factors, torch.device("cpu"))
    source = BatchSource(cfg, train, cfg.stage1.batch_size, 0)
    for i in range(warmup):
        stage.train_step(source.batch(i))
    start = time.perf_counter()
    for i in range(warmup, iterations):
        stage.train_step(source.batch(i))
    return (iterations - warmup) * cfg.stage1.batch_size / (time.perf_counter() - start)


def under_ray(cfg, overrides: list[str], variants: dict[str, list[str]]) -> dict[str, float]:
    import ray
    from mlflow.tracking import MlflowClient

    from pipelines import tracking
    from pipelines.cli import builtin_dir, builtin_options
    from pipelines.prepare_data import prepare_with_ray
    from pipelines.stage_job import run_stage
    from dsu_models.train import build_config

    # 3 logical CPUs on 2 cores: 2 for the worker's threads, 1 for Ray Data decoding
    ray.init(num_cpus=3, dashboard_host="127.0.0.1")
    try:
        data_dir = builtin_dir(cfg)
        prepare_with_ray(cfg.dataset, data_dir, **builtin_options(cfg))
        uri = tracking.default_tracking_uri()
        exp = tracking.setup(uri, "ray-overhead")
        client = MlflowClient(uri)
        out = {}
        for name, extra in variants.items():
            cfg = build_config(None, overrides + extra + [f"data_path={data_dir}"])
            parent = tracking.start_parent(client, exp, cfg)
            run_id, _ = tracking.stage_run(client, parent, "stage1", cfg)
            run_stage("stage1", cfg, str(data_dir), run_id, {}, uri, workers=1, cpus_per_worker=2)
            rates = [m.value for m in sorted(client.get_metric_history(run_id, "images_per_s"),
                                             key=lambda m: m.step)]
            if len(rates) < 2:
                raise RuntimeError("too few reports: raise --iterations")
            out[name] = sum(rates[1:]) / len(rates[1:])
            print(f"Ray Train (1 worker, 2 threads), {name}: {out[name]:.1f} img/s", flush=True)
        return out
    finally:
        ray.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=6000)
    args = parser.parse_args()
    os.environ.setdefault("DSU_HOME", tempfile.mkdtemp(prefix="dsu-bench-"))
    from dsu_models.train import build_config
    report = max(args.iterations // 6, 1)
    overrides = ["labeled_factors=[floor_hue, wall_hue, object_hue, shape]",
                 f"image_size={args.image_size}", f"num_samples={args.samples}",
                 f"stage1.iterations={args.iterations}", f"stage1.report_interval={report}",
                 f"stage1.checkpoint_interval={args.iterations}",
                 f"stage1.sample_interval={args.iterations}"]
    cfg = build_config(None, overrides)
    torch.set_num_threads(2)
    # single process before and after the Ray run: a shared machine's load drifts
    before = single_process(cfg, args.iterations, warmup=report)
    print(f"single process: {before:.1f} img/s", flush=True)
    variants = {"streaming every epoch": ["worker_cache_mb=0"],
                "epochs after the first from memory": []}
    ray_rates = under_ray(cfg, overrides, variants)
    after = single_process(cfg, args.iterations, warmup=report)
    print(f"single process again: {after:.1f} img/s")
    single = (before + after) / 2
    for name, rate in ray_rates.items():
        print(f"overhead, {name}: {100 * (1 - rate / single):.1f}% vs the mean single-process "
              f"rate (target <= 10%)")


if __name__ == "__main__":
    main()
