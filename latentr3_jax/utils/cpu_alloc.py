"""Keep XLA's per-step host buffers in the heap instead of fresh page-faulting mappings.

On the CPU backend every execution of a jitted step allocates its temporaries (hundreds of
MB for a training step) with `posix_memalign` from an XLA worker thread. glibc serves
allocations that large from a new `mmap` and unmaps them on free, and for threads outside
the main arena it does so even when `M_MMAP_MAX` is 0, so each step page-faults its whole
working set again: 220-320 MiB per step for the benchmark model in bench/bench_sft.py,
about 50-90 ms of a 230-400 ms step on this 2-core machine.

`configure()` switches glibc to one arena (`M_ARENA_MAX=1`), no mmap-backed chunks
(`M_MMAP_MAX=0`) and no trimming of the heap top (`M_TRIM_THRESHOLD`), so freed step
buffers are reused by the next step. The cost: the process keeps its peak heap instead
of returning it to the OS, and malloc-heavy threads share one arena. It must run before
XLA starts its threads (before the first JAX computation); arenas created earlier keep
their behaviour. `latentr3` calls it at start-up; set LATENTR3_CPU_MALLOC=system to keep
glibc's defaults. A no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

ENV = "LATENTR3_CPU_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_applied = None


def configure(mode: Optional[str] = None) -> bool:
    """Apply the heap-reuse policy unless `mode` (default: $LATENTR3_CPU_MALLOC) is
    'system'. Returns whether it is in effect. Idempotent."""
    global _applied
    mode = (mode or os.environ.get(ENV, "reuse")).strip().lower()
    if mode not in ("reuse", "system"):
        raise ValueError(f"{ENV} must be 'reuse' or 'system', got {mode!r}")
    if mode == "system":
        return False
    if _applied is not None:
        return _applied
    _applied = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    _applied = ok
    if not ok:
        log.debug("mallopt refused the heap-reuse settings; keeping the system allocator")
    return ok
