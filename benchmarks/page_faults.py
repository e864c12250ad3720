"""Minor page faults per stage-1 ``train_step``, with glibc's default heap
thresholds and with ``allocator.retain_freed_memory``, in the main thread and
in a second thread (where a Ray Train worker runs its loop).

    python benchmarks/page_faults.py [--steps 7]

Each case runs in a fresh process (the thresholds are process-wide); it prints
the median step's fault count, as counted by the kernel (getrusage).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys, threading, torch
from dsu_models.allocator import retain_freed_memory
from dsu_models.stages.stage1 import Stage1
from tests.tiny import tiny_batch, tiny_config, tiny_factors
torch.set_num_threads(2)
retain, where, steps = sys.argv[1] == "retain", sys.argv[2], int(sys.argv[3])
if retain:
    retain_freed_memory()

def train():
    cfg = tiny_config("image_size=32", "architecture.conv_channels=[32, 64]",
                      "architecture.fc_features=256", "all_stages.batch_size=64")
    torch.manual_seed(0)
    stage = Stage1(cfg, tiny_factors(cfg), "cpu")
    batch = tiny_batch(cfg, 64)
    for _ in range(4):
        stage.train_step(batch)
    faults = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stage.train_step(batch)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[len(faults) // 2])

if where == "thread":
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
else:
    train()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    print(f"{'thread':7} {'default':>8} {'retain':>8}   (median minor faults per stage-1 step)")
    for where in ("main", "thread"):
        row = []
        for mode in ("default", "retain"):
            out = subprocess.run([sys.executable, "-c", PROBE, mode, where, str(args.steps)], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            row.append(int(out.stdout.strip().splitlines()[-1]))
        print(f"{where:7} {row[0]:8d} {row[1]:8d}", flush=True)


if __name__ == "__main__":
    main()
