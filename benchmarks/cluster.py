"""Stage 1 on a simulated multi-node cluster (pipelines/cluster/local_cluster.py):
images/s with 1 and 2 Train workers at the same global batch, what the storage
hand-offs cost, and the time to recover from a killed node.

    python benchmarks/cluster.py [--iterations 60] [--batch 32]

A head with no CPUs and three worker nodes (2 logical CPUs each) in their own
mount namespaces, an ``mlflow server`` on 127.0.0.1 and a shared storage
folder. Each run is ``full.py --stages stage1`` on the ``tiny`` preset
(``--iterations`` stage-1 iterations, reports every tenth of them). Printed:

- images/s: the median of the reports after the first (start-up), rank 0's
  ``images_per_s`` from MLflow, and the stage's wall time;
- hand-offs: size of the stage's checkpoint and the seconds to copy it into the
  storage and back (what each checkpoint and each restart moves);
- recovery: a worker node is SIGKILLed after the first checkpoint; seconds from
  the kill to the restarted group's first progress line.

Correctness-scale figures: all "nodes" share this machine's cores, so two
workers cannot be faster than one here; on real nodes they add cores.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage1(cluster, tracking_uri: str, workers: int, iterations: int, batch: int, kill: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    every = max(1, iterations // 10)
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "DSU_HOME": str(cluster.home), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "pipelines/full.py", "--config", "tiny", "--stages", "stage1",
            "--workers", str(workers), "--cpus-per-worker", "1", "--storage", str(cluster.shared),
            "--tracking-uri", tracking_uri, f"stage1.iterations={iterations}", f"all_stages.batch_size={batch}",
            f"stage1.report_interval={every}", f"stage1.checkpoint_interval={2 * every}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    killed = {}
    started = time.monotonic()
    for line in proc.stdout:
        out.append(line)
        m = re.search(r"\[stage1\] (\d+)/%d \|" % iterations, line)
        if kill and m and not killed and int(m.group(1)) > 2 * every:
            victims = cluster.nodes_running("TrainWorker")
            if victims:
                cluster.kill_node(victims[0])
                killed["at"] = time.monotonic()
        elif killed and ("resuming from iteration" in line or "Started training worker group" in line):
            killed["resumed"] = True  # a new group (from the checkpoint, or from scratch)
        elif killed.get("resumed") and "recovered" not in killed and m:
            killed["recovered"] = time.monotonic() - killed["at"]
    proc.wait()
    wall = time.monotonic() - started
    text = "".join(out)
    if proc.returncode != 0:
        raise SystemExit(f"stage 1 with {workers} workers failed:\n{text[-3000:]}")
    client = MlflowClient(tracking_uri)
    run_id = re.search(r"\[stage1\] MLflow run (\w+)", text).group(1)
    rates = [m.value for m in sorted(client.get_metric_history(run_id, "images_per_s"), key=lambda m: m.step)]
    done = re.search(r"\[stage1\] done in (\d+) s", text)
    return {"rate": statistics.median(rates[1:] or rates), "stage_s": int(done.group(1)) if done else wall,
            "run_id": run_id, "recovery_s": killed.get("recovered"),
            "resumed_at": [int(x) for x in re.findall(r"resuming from iteration (\d+)", text)]}


def handoff_cost(shared: Path) -> tuple[float, float, float]:
    """(MiB, seconds into storage, seconds back) for the newest stage-1 checkpoint."""
    import pyarrow.fs as pafs

    newest = max((p for p in shared.glob("ray_results/stage1-*/checkpoint_*") if p.is_dir()),
                 key=lambda p: p.stat().st_mtime)
    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 2 ** 20
    local = pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        local.create_dir(str(shared / "bench-copy"))
        local.create_dir(f"{tmp}/back")
        t0 = time.perf_counter()
        pafs.copy_files(str(newest), str(shared / "bench-copy"), source_filesystem=local,
                        destination_filesystem=local)
        up = time.perf_counter() - t0
        t0 = time.perf_counter()
        pafs.copy_files(str(shared / "bench-copy"), f"{tmp}/back", source_filesystem=local,
                        destination_filesystem=local)
        down = time.perf_counter() - t0
    local.delete_dir(str(shared / "bench-copy"))
    return size, up, down


def main() -> int:
    from pipelines.cluster.local_cluster import Cluster, namespaces_work

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--batch", type=int, default=32, help="global batch (both worker counts)")
    a = p.parse_args()
    reason = namespaces_work()
    if reason:
        print(f"cannot simulate a cluster here: {reason}", file=sys.stderr)
        return 2
    cluster = Cluster()
    try:
        t0 = time.monotonic()
        cluster.start()
        for name in ("a", "b", "c"):
            cluster.add_node(name, cpus=2)
        uri = cluster.start_mlflow()
        print(f"cluster: head (0 CPUs) + 3 nodes x 2 CPUs, up in {time.monotonic() - t0:.0f} s; "
              f"stage 1 of the tiny preset, {a.iterations} iterations, global batch {a.batch}", flush=True)
        runs = {w: stage1(cluster, uri, w, a.iterations, a.batch) for w in (1, 2)}
        for w, r in runs.items():
            print(f"  {w} worker(s): {r['rate']:.1f} images/s (median report), stage {r['stage_s']} s", flush=True)
        print(f"  2 workers / 1 worker: {runs[2]['rate'] / runs[1]['rate']:.2f}x images/s")
        size, up, down = handoff_cost(cluster.shared)
        print(f"  checkpoint hand-off: {size:.2f} MiB, {up * 1000:.0f} ms into the storage, "
              f"{down * 1000:.0f} ms back")
        killed = stage1(cluster, uri, 2, a.iterations, a.batch, kill=True)
        if killed["recovery_s"] is None:
            print(f"  node killed mid stage 1: no restart followed (the killed node held no live "
                  f"Train worker by then); stage {killed['stage_s']} s", flush=True)
        else:
            print(f"  node killed mid stage 1: first report of the restarted group "
                  f"{killed['recovery_s']:.1f} s after the kill (resumed from iteration "
                  f"{killed['resumed_at'] or 'none'}); stage {killed['stage_s']} s", flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
