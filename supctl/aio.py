"""Running the event loop: uvloop when available, on a tuned allocator.

uvloop cuts the per-event cost of the asyncio loop by about a fifth for our
workload (many small reads and writes per stream), measured with bench/bench.py.
It is optional so the programs still run where it cannot be installed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap, never from their own mmap().
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the top of the heap is given back to the system only beyond this.
TRIM_THRESHOLD = 8 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep the data path's big buffers in the heap (glibc only; False elsewhere).

    Every message of a bulk transfer allocates and frees buffers of about 256 KiB
    (websockets' reads, TLS records, our frames).  glibc's defaults serve them with
    mmap() or give the heap's top back after each burst, so every buffer costs
    page faults, zeroing and unmapping: about a sixth of the enforcer's time in
    bench/bench.py.  With both thresholds above the largest message (2 MiB), freed
    buffers are reused; at most TRIM_THRESHOLD of free heap is kept.  (Measured:
    single-stream MB/s +15-40% and steadier.)  An explicit MALLOC_MMAP_THRESHOLD_
    or MALLOC_TRIM_THRESHOLD_ in the environment wins.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like asyncio.run, on uvloop when it is installed, with :func:`tune_allocator`."""
    tune_allocator()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
