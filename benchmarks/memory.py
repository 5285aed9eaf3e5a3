"""Peak memory of one call, for the benchmarks: what it allocates beyond what was there.

CPU: the resident set, in a process started with ``MALLOC_MMAP_THRESHOLD_`` set to
:data:`MMAP_THRESHOLD` so that glibc serves every allocation above 64 KiB by ``mmap`` and
returns it to the OS when freed (by default glibc keeps freed blocks, and the resident set
stops tracking what torch holds). The peak resident set (``VmHWM``) is reset to the current
one through ``/proc/self/clear_refs`` just before the call; after it, ``VmHWM`` minus the
resident set before the call is the call's peak extra memory: every buffer it allocated,
transient or returned, its inputs excluded. ``tracemalloc`` would see none of torch's
allocations. That setting makes allocation-heavy code slower (a page-zeroing ``mmap`` per
buffer), so time such code in a process without it. Linux only; elsewhere the figure is
``None``.

CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call (the
caching allocator's reserve, which a second call would reuse, is not counted).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

MMAP_THRESHOLD = 64 * 1024
"""Bytes above which glibc is to serve (and return) allocations by ``mmap``."""


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def can_measure_rss() -> bool:
    """Whether :func:`peak_extra_bytes` can measure CPU memory here (Linux, writable
    ``/proc/self/clear_refs``)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def peak_extra_bytes(call: Callable[[], object], device: str) -> tuple[object, int | None, int | None]:
    """Run ``call()`` once and measure its peak extra memory (see the module docstring).

    Returns:
        ``(call's result, peak extra bytes, peak of the whole process in bytes)``; the two
        figures are ``None`` where they cannot be measured (CPU memory off Linux). On CUDA
        the process figure is the device's peak allocation, weights included.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return out, peak - before, peak
    if not can_measure_rss():
        return call(), None, None
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    out = call()
    peak = _status_kib("VmHWM")
    return out, (peak - before) * 1024, peak * 1024
