"""A stage's training steps reuse freed memory instead of faulting it back in
(dsu_models/allocator.py): page faults per step, counted by the kernel, so the
check does not depend on how busy the machine is."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dsu_models import allocator
from tests.tiny import load_benchmark

ROOT = Path(__file__).resolve().parents[1]

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


@glibc_only
def test_retain_freed_memory_sets_the_thresholds_once():
    assert allocator.retain_freed_memory() is True
    assert allocator.retain_freed_memory() is True


def _median_faults(mode: str) -> int:
    """The median stage-1 step's minor faults in a fresh process (the probe of
    benchmarks/page_faults.py, main thread, 7 steps after 4 warm-up steps)."""
    probe = load_benchmark("page_faults").PROBE
    out = subprocess.run([sys.executable, "-c", probe, mode, "main", "7"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_retained_memory_is_not_faulted_back_in_every_step():
    # Activations of a few MiB each (32 px, 32-64 channels, batch 64): glibc's
    # default thresholds unmap or trim them after every step. Fresh processes, so
    # that nothing else in this test session has set the thresholds. Measured in
    # the main thread: 0-4 faults with the thresholds set (a step that first uses a
    # new tensor size faults it in once), 3,300-4,800 without. The thread case (a
    # Ray Train worker's loop) varies with the machine; benchmarks/page_faults.py
    # prints it.
    retained = _median_faults("retain")
    default = _median_faults("default")
    assert retained < 100, f"{retained} page faults in the median stage-1 step"
    assert default > 10 * max(retained, 1), (retained, default)


def test_the_library_leaves_the_allocator_alone_and_the_runners_opt_in():
    # Building a stage changes nothing process-wide; the three training entry
    # points (runner, Ray Train worker, Tune trial) set the thresholds themselves.
    import inspect

    from dsu_models import train
    from dsu_models.stages import common
    from pipelines.jobs import worker
    from pipelines.sweeps import trial
    assert "retain_freed_memory" not in inspect.getsource(common)
    for module in (train, worker, trial):
        assert "retain_freed_memory()" in inspect.getsource(module), module.__name__
