"""Keep freed heap memory in a training process instead of handing it back to
the kernel every step (glibc's malloc; elsewhere a no-op).

A training step allocates and frees the same activation-sized blocks every
iteration. glibc's default malloc serves blocks of 128 KiB and more with
``mmap`` (until a freed one raises its dynamic threshold) and gives the free
top of the heap back with ``brk``/``madvise`` once it exceeds the trim
threshold, so the next step faults the same pages in again, zero-filled by
the kernel. Measured on this repository's 2-core CPU machine at 32 px RGB,
batch 64, default architecture (minor page faults and kernel time per
``train_step``, glibc 2.36): stage 1 3,430 faults and 7 ms, stage 2 6,580 and
13 ms (up to 13,300 and 46 ms in another run); with
:func:`retain_freed_memory`, 230 and 130 faults and under 1 ms. The median
step of the test's stage (tests/test_allocator.py) faults 0-4 times instead of
3,300-4,800.

A thread other than the main one (Ray Train runs the training loop in one)
allocates from its own arena of 64 MiB heaps, which glibc trims and unmaps
under another rule (the top pad); without it, the thread's median step still
faulted 4,600-5,100 times.

The cost is that a process keeps the heap at its peak size, which for a
training process is the size it needs anyway.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc caps M_MMAP_THRESHOLD at 4 MiB * sizeof(long) (32 MiB on 64-bit) and
# refuses larger values; blocks above it are still mapped per allocation.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
# Threads other than the main one allocate from heaps of at most 64 MiB, which
# glibc shrinks (heap_trim) or unmaps (delete_heap) whenever their free top
# exceeds the top pad, whatever the trim threshold: a pad of a whole heap keeps
# them. (The main arena's heap then grows in steps of 64 MiB of address space.)
TOP_PAD = 64 << 20

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds and its top pad for this process, once.

    Returns True when the thresholds are (or already were) set, False on a C
    library other than glibc (macOS, musl), where nothing is changed.
    """
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; setting M_MMAP_THRESHOLD also turns off the
    # dynamic threshold, so the setting holds for the life of the process.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                and libc.mallopt(M_TOP_PAD, TOP_PAD))
