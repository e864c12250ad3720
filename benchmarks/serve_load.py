"""Bounded load test of the Ray Serve model service on loopback, against the
library in-process on the same batches.

    python benchmarks/serve_load.py [--model URI_OR_DIR] [--requests 256] [--levels 1,8,32]
                                    [--config quick] [--threads 1] [--second-model URI_OR_DIR]
                                    [key=value ...]

Without ``--model`` it builds a model of ``--config``'s networks (the default
pipeline's, 32 px) with one training step per stage: throughput does not depend
on the weights. It starts a local Ray and the service (one replica,
``--threads`` torch threads, Serve's proxy on 127.0.0.1 only), then for each
concurrency level sends a fixed number of ``POST /swap?shape=K`` requests (one
raw PNG each, the curl path) from that many client threads with kept-alive
connections; every request has a 30 s timeout and the whole run a deadline,
so it stops by itself. It prints requests/s, images/s, p50/p95/p99 latency and
errors per level, next to ``DisUnknownModel.swap`` called in-process on the
same images: one image per call (the latency to compare concurrency 1 with)
and the level's whole batch in one call (the best batching could do).

Then the two-model mix: the same levels with requests alternating between the
default model (no header) and a second one chosen with the
``serve_multiplexed_model_id`` header (``--second-model``, else the first
model's bundle saved again in another folder: a second copy in memory with the
same cost), printed beside the single-model figures.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

DEADLINE_S = 600        # the whole load test stops after this
REQUEST_TIMEOUT_S = 30


def build_model(config: str, overrides: list[str], out: Path) -> Path:
    """A bundle of ``config``'s networks after one step per stage (weights do not
    change the cost of a forward pass)."""
    from dsu_models.bundle import bundle_from_run, save_bundle
    from dsu_models.config import load_config
    from dsu_models.data.configured import load_data
    from dsu_models.train import run

    cfg = load_config(config, ["num_samples=512", "all_stages.iterations=1", "all_stages.report_interval=1",
                                "all_stages.sample_interval=1000", "all_stages.checkpoint_interval=1000",
                                "device=cpu", *overrides])
    results = run(cfg, out / "run", log=lambda line: None)
    train, val, test = load_data(cfg)
    return save_bundle(bundle_from_run(results, train, test), out / "model")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_level(port: int, bodies: list[bytes], factor: str, classes: int, concurrency: int,
               requests: int, deadline: float, models: tuple[str | None, ...] = (None,)) -> dict:
    """``requests`` swaps from ``concurrency`` threads; latencies in ms. Request ``i``
    goes to ``models[i % len(models)]`` (None: the default, no header)."""
    latencies, errors = [], []

    def client(worker: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        mine = range(worker, requests, concurrency)
        try:
            for i in mine:
                if time.monotonic() > deadline:
                    errors.append("deadline")
                    continue
                started = time.perf_counter()
                try:
                    model = models[i % len(models)]
                    conn.request("POST", f"/swap?{factor}={i % classes}", body=bodies[i % len(bodies)],
                                 headers={"Content-Type": "image/png",
                                          **({"serve_multiplexed_model_id": model} if model else {})})
                    reply = conn.getresponse()
                    data = reply.read()
                    if reply.status != 200 or not data.startswith(b"\x89PNG"):
                        errors.append(f"HTTP {reply.status}")
                        continue
                except (OSError, http.client.HTTPException) as exc:
                    errors.append(type(exc).__name__)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "ok": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "req_per_s": len(latencies) / wall,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99)}


def get_info(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("GET", "/info")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def served_counts(port: int) -> dict:
    return get_info(port)["served"]


def get_level(port: int, path: str, concurrency: int, requests: int, deadline: float) -> float:
    """Requests/s of ``GET path`` (what HTTP and Serve cost with no model work)."""
    def client(worker: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        ok = 0
        try:
            for _ in range(worker, requests, concurrency):
                if time.monotonic() > deadline:
                    break
                conn.request("GET", path)
                reply = conn.getresponse()
                reply.read()
                ok += reply.status == 200
        finally:
            conn.close()
        return ok

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ok = sum(pool.map(client, range(concurrency)))
    return ok / (time.perf_counter() - started)


def in_process(model, images: torch.Tensor, factor: str, classes: int, batch: int, repeats: int) -> dict:
    """``model.swap`` on ``batch`` images per call: images/s and per-call latency (ms)."""
    times = []
    for r in range(repeats):
        x = images[(r * batch) % len(images):][:batch]
        if x.shape[0] < batch:
            x = images[:batch]
        started = time.perf_counter()
        model.swap(x, {factor: r % classes})
        times.append((time.perf_counter() - started) * 1000)
    return {"img_per_s": batch * 1000 / statistics.mean(times), "p50": percentile(times, 50),
            "p99": percentile(times, 99)}


def mix_levels(port: int, bodies: list[bytes], factor: str, classes: int, levels: list[int], requests: int,
               deadline: float, second: str, single_rate: dict[int, float]):
    """The levels again, requests alternating between the default model and ``second``."""
    models = (None, second)
    warm = load_level(port, bodies, factor, classes, 1, 8, deadline, models)   # loads the second model
    loaded = get_info(port)["models"]["loaded"]
    if warm["errors"] or second not in loaded:
        print(f"two-model mix: the second model does not answer ({warm['error_kinds']}, loaded: {loaded}); "
              f"skipped")
        return
    print(f"two-model mix: requests alternate between the default and {second}")
    print(f"{'conc':>4} {'ok':>5} {'err':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'single req/s':>13} {'mix/single':>11}")
    for c in levels:
        before = served_counts(port)
        r = load_level(port, bodies, factor, classes, c, requests, deadline, models)
        after = served_counts(port)
        per_pass = (after["requests"] - before["requests"]) / max(1, after["forward_passes"]
                                                                  - before["forward_passes"])
        print(f"{c:>4} {r['ok']:>5} {r['errors']:>4} {r['req_per_s']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} "
              f"{r['p99']:>8.1f} {single_rate[c]:>13.1f} "
              f"{r['req_per_s'] / single_rate[c] if single_rate[c] else float('nan'):>11.2f}"
              f"  ({per_pass:.1f} requests per forward pass)"
              + (f"  errors: {r['error_kinds']}" if r["errors"] else ""), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="bundle directory or MLflow URI (default: build one)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--config", default="quick", help="networks to build without --model")
    parser.add_argument("--requests", type=int, default=256, help="requests per level (at most 2000)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--port", type=int, default=8765, help="loopback port for Serve's proxy")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the replica and in-process")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=4.0)
    parser.add_argument("--factor", help="factor to swap (default: the last labeled one)")
    parser.add_argument("--second-model", help="the mix's second model, a URI or bundle directory of the "
                        "same image size (default: the first one saved again in another folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides for the built model")
    a = parser.parse_args(argv)
    levels = [int(v) for v in a.levels.split(",")]
    if not 1 <= a.requests <= 2000 or not all(1 <= c <= 64 for c in levels):
        parser.error("--requests 1..2000 and concurrency levels 1..64 keep the test bounded")

    import ray
    from ray import serve

    from dsu_models.inference import DisUnknownModel
    from pipelines.serve import start
    from dsu_models.data.codec import encode_png

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="dsu-serve-load-") as tmp:
        model_uri = a.model or str(build_model(a.config, a.overrides, Path(tmp)))
        model = DisUnknownModel.load(model_uri, device="cpu", tracking_uri=a.tracking_uri)
        second = a.second_model or str(model.save(Path(tmp) / "second-model"))
        if Path(second).expanduser().exists():
            second = str(Path(second).expanduser().resolve())
        factor = a.factor or model.labeled_factors[-1]
        classes = model.factors[model.factor_index(factor)].classes
        images = (model.examples["images"] if model.examples is not None else
                  torch.randint(0, 256, (16, model.config.image_channels, model.config.image_size,
                                         model.config.image_size), dtype=torch.uint8))
        bodies = [encode_png(im.permute(1, 2, 0).numpy()) for im in images]
        print(f"model: {model_uri} ({model}); swapping {factor!r} over {classes} classes; "
              f"{a.threads} torch thread(s)", flush=True)

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = a.port
        try:
            start({"model": model_uri, "tracking_uri": a.tracking_uri, "device": "cpu", "num_cpus": 1,
                   "threads": a.threads, "max_batch_size": a.max_batch_size,
                   "batch_wait_timeout_s": a.batch_wait_ms / 1000, "models": [second]}, port=port)
            deadline = time.monotonic() + DEADLINE_S
            load_level(port, bodies, factor, classes, 1, 16, deadline)      # warm-up
            floor = get_level(port, "/info", max(levels), a.requests, deadline)
            print(f"HTTP + Serve floor (GET /info, no model): {floor:.1f} req/s at concurrency {max(levels)}")
            single = in_process(model, images, factor, classes, 1, 64)
            print(f"in-process swap, 1 image per call: {single['img_per_s']:.1f} img/s, "
                  f"p50 {single['p50']:.1f} ms, p99 {single['p99']:.1f} ms")
            print(f"{'conc':>4} {'ok':>5} {'err':>4} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
                  f"{'p99 ms':>8} {'in-proc batched img/s':>22} {'served/in-proc':>15}")
            single_rate = {}
            for c in levels:
                before = served_counts(port)
                r = load_level(port, bodies, factor, classes, c, a.requests, deadline)
                after = served_counts(port)
                passes = after["forward_passes"] - before["forward_passes"]
                r["per_pass"] = (after["requests"] - before["requests"]) / max(1, passes)
                batched = in_process(model, images.repeat(max(1, c // len(images) + 1), 1, 1, 1),
                                     factor, classes, c, max(8, 256 // c))
                single_rate[c] = r["req_per_s"]
                print(f"{c:>4} {r['ok']:>5} {r['errors']:>4} {r['req_per_s']:>8.1f} {r['req_per_s']:>8.1f} "
                      f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {batched['img_per_s']:>22.1f} "
                      f"{r['req_per_s'] / batched['img_per_s']:>15.2f}"
                      + f"  ({r['per_pass']:.1f} requests per forward pass)"
                      + (f"  errors: {r['error_kinds']}" if r["errors"] else ""), flush=True)
                if c == 1:
                    print(f"     concurrency-1 p99 minus in-process p99: {r['p99'] - single['p99']:.1f} ms")
            mix_levels(port, bodies, factor, classes, levels, a.requests, deadline, second, single_rate)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
