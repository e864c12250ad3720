"""Ingest benchmark: prepare ``shapes3d`` with the Ray job, then stream it with
the Ray Data training reader; report images/s and memory, per phase.

    python benchmarks/ingest.py --samples 480000 --image-size 64 --batch-size 32

Memory is sampled from /proc every 0.5 s over this process and all its
descendants (Ray's GCS, raylet and workers) and reported as separate figures,
because summing RSS over processes counts the same pages many times (torch's
shared libraries in every worker, the object store mapped by several processes):

* driver peak RSS: this process;
* largest worker peak RSS: the largest single Ray worker at any sample
  (task processes; Ray's raylet, GCS, agents and its internal actors such as
  Ray Data's _StatsActor count as services);
* peak summed USS: unique memory (Private_Clean + Private_Dirty from
  /proc/<pid>/smaps_rollup) summed over all processes at one sample, split
  into driver, workers and Ray services;
* object store: the shared-memory pages of Ray's object store (the largest
  RssShmem of any process, i.e. the raylet's mapping), reported apart;
* for comparison, the old figure: summed RSS of the whole tree.

Measured (2 CPUs shared with other runs, 64 px, 150,016 images streamed from
train splits of 235 and 20 Parquet files, the file counts of 480k and 40k
prepared images): Ray 2.60's default V2 Parquet reader lists files with a
pool of ``FooterReader`` actors, one process each: 26 worker processes,
summed USS 3.82 GiB, largest worker 1.80 GiB RSS at 235 files. Reading
through the V1 datasource (``pipelines/data/loading.py``) keeps 4 worker
processes and summed USS 1.95 GiB at both file counts.

Then (quiet 2-core CPU, the full 480,000 images at 64 px): the decode workers
held 0.46 GiB USS each because they were the preparation's task workers,
which had imported torch; preparation now runs in an actor pool that ends
with it and imports no torch for the procedural sources, and images travel
as uint8. Preparing: 2,766 img/s, peak summed USS 1.45 GiB (was 1.89);
streaming 431,968 images: 4,699 img/s, peak summed USS 1.56 GiB (was 2.22,
at 3,191 img/s); object store 0.22 GiB.

Memory is bounded here by a fixed object store (``--object-store-mb``), small
Ray Data blocks and an object-store budget for Ray Data's streaming executor;
drawing is sliced inside the renderer. With ``RAY_ADDRESS`` set the benchmark
joins that cluster and the limits are the cluster's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

GiB, MiB = 2**30, 2**20


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def _kb(fields: dict, key: str) -> int:
    return int(fields.get(key, "0 kB").split()[0]) * 1024


def _uss(pid: int) -> int:
    """Unique set size (bytes): pages mapped by this process only."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


# Ray's own processes that show up as "ray::..." or mention the worker script
_RAY_SERVICES = ("ray::_StatsActor", "ray::_Autoscaling", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _role(pid: int, me: int) -> str:
    """driver (this process), worker (a Ray task/actor process running our code) or service."""
    if pid == me:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "service"
    if cmd.startswith(_RAY_SERVICES) or "raylet" in cmd.split(" ", 1)[0]:
        return "service"
    # workers rename themselves "ray::<task>" (ray::IDLE between tasks)
    return "worker" if cmd.startswith("ray::") or "default_worker.py" in cmd else "service"


class MemoryMonitor:
    """Samples memory of this process tree in a thread; see the module docstring."""

    def __init__(self, interval: float = 0.5):
        self.interval, self._stop = interval, threading.Event()
        self.peak = {"driver_rss": 0, "driver_uss": 0, "worker_rss": 0, "worker_uss": 0,
                     "uss_sum": 0, "uss_driver": 0, "uss_workers": 0, "uss_services": 0,
                     "object_store": 0, "rss_sum": 0, "workers": 0}
        self.at_peak: list[tuple[str, str, int, int]] = []   # (role, name, rss, uss) at peak USS
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree(me: int) -> list[int]:
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent[int(pid)] = int(_status(int(pid))["PPid"])
            except (OSError, KeyError, ValueError):
                continue
        tree, frontier = [me], [me]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parent.items() if pp == p]
            tree += kids
            frontier += kids
        return tree

    def sample(self) -> None:
        me = os.getpid()
        now = {"uss_driver": 0, "uss_workers": 0, "uss_services": 0, "rss_sum": 0,
               "object_store": 0, "workers": 0}
        procs = []
        for pid in self._tree(me):
            try:
                st, uss, role = _status(pid), _uss(pid), _role(pid, me)
            except (OSError, KeyError, ValueError):
                continue                              # the process ended meanwhile
            rss = _kb(st, "VmRSS")
            procs.append((role, st.get("Name", "?").strip(), rss, uss))
            now["rss_sum"] += rss
            now["object_store"] = max(now["object_store"], _kb(st, "RssShmem"))
            now["uss_" + {"driver": "driver", "worker": "workers", "service": "services"}[role]] += uss
            if role == "driver":
                self._max(driver_rss=rss, driver_uss=uss)
            elif role == "worker":
                now["workers"] += 1
                self._max(worker_rss=rss, worker_uss=uss)
        now["uss_sum"] = now["uss_driver"] + now["uss_workers"] + now["uss_services"]
        if now["uss_sum"] > self.peak["uss_sum"]:
            self.at_peak = sorted(procs, key=lambda p: -p[3])
        self._max(**now)

    def _max(self, **values) -> None:
        for k, v in values.items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.sample()

    def report(self) -> str:
        p = self.peak
        g = {k: v / GiB for k, v in p.items() if k != "workers"}
        return (f"  driver peak RSS {g['driver_rss']:.2f} GiB (USS {g['driver_uss']:.2f})\n"
                f"  largest worker peak RSS {g['worker_rss']:.2f} GiB (USS {g['worker_uss']:.2f}); "
                f"up to {p['workers']} worker processes\n"
                f"  peak summed USS {g['uss_sum']:.2f} GiB (driver {g['uss_driver']:.2f}, "
                f"workers {g['uss_workers']:.2f}, Ray services {g['uss_services']:.2f})\n"
                f"  object store shared memory (peak RssShmem) {g['object_store']:.2f} GiB\n"
                f"  [old figure, double-counts shared pages: summed RSS {g['rss_sum']:.2f} GiB]\n"
                f"  at peak USS (role name RSS/USS MiB): "
                + ", ".join(f"{r} {n} {rss // MiB}/{uss // MiB}" for r, n, rss, uss in self.at_peak))


def init_bounded_ray(object_store_mb: int, num_cpus: int | None):
    """Start (or join) Ray with a fixed object store and small Ray Data blocks."""
    from pipelines.cluster.ray_init import init_ray

    ray = init_ray(num_cpus, dashboard=False, object_store_memory=object_store_mb * MiB)
    ctx = ray.data.DataContext.get_current()
    # blocks of at most 16 MiB (default 128 MiB); the streaming executor may keep
    # at most half the object store in flight, so it backs off instead of spilling
    ctx.target_max_block_size = 16 * MiB
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=object_store_mb * MiB // 2)
    return ray


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=480_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--stream-images", type=int, default=None, help="stop streaming after this many")
    ap.add_argument("--object-store-mb", type=int, default=512, help="local Ray object store size")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    ap.add_argument("--out", default=None, help="prepared dir (default: a temp dir, removed)")
    a = ap.parse_args()

    from pipelines.data.loading import iter_epochs, train_dataset
    from pipelines.jobs.prepare import prepare_with_ray

    init_bounded_ray(a.object_store_mb, a.num_cpus)
    tmp = None if a.out else tempfile.mkdtemp(prefix="dsu-ingest-")
    out = Path(a.out or tmp) / "shapes3d"
    try:
        with MemoryMonitor() as mem:
            t0 = time.time()
            prepare_with_ray("shapes3d", out, num_samples=a.samples, image_size=a.image_size)
            prep_s = time.time() - t0
        print(f"prepare: {a.samples} images {a.image_size}px in {prep_s:.1f} s "
              f"({a.samples / prep_s:.0f} img/s)\n{mem.report()}", flush=True)
        ds = train_dataset(out)
        with MemoryMonitor() as mem:
            n, t0 = 0, None
            for _, batch in iter_epochs(ds, a.batch_size, epochs=1):
                if t0 is None:                      # exclude pipeline start-up
                    t0 = time.time()
                    continue
                n += len(batch["id"])
                if a.stream_images and n >= a.stream_images:
                    break
            dt = time.time() - t0
        print(f"stream: {n} images ({a.image_size}px RGB float, batch {a.batch_size}) in {dt:.1f} s "
              f"= {n / dt:.0f} img/s\n{mem.report()}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
