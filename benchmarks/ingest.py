"""Ingest benchmark: prepare ``shapes3d`` with the Ray job, then stream it with
the Ray Data training reader; report images/s and the peak RSS of the driver
plus every Ray worker process (sampled every 0.2 s).

    python benchmarks/ingest.py --samples 480000 --image-size 64 --batch-size 32
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import os


class PeakRSS:
    """Peak summed RSS (bytes) of this process and all its descendants (Ray workers)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss() -> int:
        """Summed VmRSS of this process and its descendants, from /proc (Linux)."""
        parent, rss = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                parent[int(pid)] = int(fields["PPid"])
                rss[int(pid)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            except (OSError, KeyError, ValueError):
                continue
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parent.items() if pp == p and c not in tree]
            tree.update(kids)
            frontier += kids
        return sum(rss.get(p, 0) for p in tree)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=480_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--stream-images", type=int, default=None, help="stop streaming after this many")
    ap.add_argument("--out", default=None, help="prepared dir (default: a temp dir, removed)")
    a = ap.parse_args()

    from pipelines.data_loading import iter_epochs, train_dataset
    from pipelines.prepare_data import init_ray, prepare_with_ray

    init_ray()
    tmp = None if a.out else tempfile.mkdtemp(prefix="dsu-ingest-")
    out = Path(a.out or tmp) / "shapes3d"
    try:
        with PeakRSS() as mem:
            t0 = time.time()
            prepare_with_ray("shapes3d", out, num_samples=a.samples, image_size=a.image_size)
            prep_s = time.time() - t0
        print(f"prepare: {a.samples} images {a.image_size}px in {prep_s:.1f} s "
              f"({a.samples / prep_s:.0f} img/s), peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)
        ds = train_dataset(out)
        with PeakRSS() as mem:
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
              f"= {n / dt:.0f} img/s, peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
