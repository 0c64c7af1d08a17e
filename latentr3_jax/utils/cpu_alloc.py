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
their behaviour. A no-op where libc is not glibc.

The policy pays off for small models and costs for large ones. On this project's 2-core
VM the plain training step of a 6.0M-parameter decoder took 351 ms with it against 407 ms
without (bench/bench_sft.py --investigate); at SmolLM2-135M's shape (134.5M), timed in
turns (bench/malloc_ab.py), it took 17.2 s against 12.8 s in fp32 and 9.3 s against 7.5 s
in bf16. The cross-over between the two sizes is not measured. So the default, `auto`,
applies it only to models of at most AUTO_MAX_PARAMS parameters, or when the size is
unknown. `latentr3` calls it at start-up with the size of the model its config names;
LATENTR3_CPU_MALLOC=reuse or =system forces either.

Why it costs at 135M: XLA takes the step's temporaries in one block, about 5.6 GB for that
fp32 step, and `mallopt` takes an int, so the highest finite trim threshold is 2 GiB; the
freed block is handed back to the kernel with `brk` after every step and faulted in again
(1.38 million faults per step either way). `keep` (LATENTR3_CPU_MALLOC=keep) turns
trimming off outright (`M_TRIM_THRESHOLD=-1`): the 135M plain step then faults nothing
after its first step and runs 1.08x transformers' in turns instead of below it
(bench/step_faults.py, bench/malloc_ab.py). It is opt-in because it is not enough and not
safe (experimental): the LatentR³ SFT step at that shape kept faulting 1.9 million pages
per step under it in one run and in another grew its heap step after step until the
out-of-memory killer took it, the process never hands memory back (5 GB more resident on
the plain step), and a bf16 worker's heap grew under it until the killer took it. `release()`
(glibc's `malloc_trim`) returns the free memory at a job's end; the training loop and the
evaluator call it.
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
MODES = ("auto", "reuse", "keep", "system")
AUTO_MAX_PARAMS = 32_000_000   # `auto`: heap reuse for models up to this size
_applied = None


def configure(mode: Optional[str] = None, num_params: Optional[int] = None) -> bool:
    """Apply the heap-reuse policy per `mode` (default: $LATENTR3_CPU_MALLOC, else
    'auto'): 'reuse' always, 'keep' always and with trimming off, 'system' never, 'auto'
    unless `num_params` is known and above AUTO_MAX_PARAMS. Returns whether it is in
    effect. Idempotent once applied."""
    global _applied
    mode = (mode or os.environ.get(ENV, "auto")).strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = choose(num_params)
        log.debug("cpu_alloc: auto -> %s (%s parameters)", mode, num_params)
    if mode == "system":
        return bool(_applied)
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
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
        (M_TRIM_THRESHOLD, -1 if mode == "keep" else 2 ** 31 - 1)))
    _applied = ok
    if not ok:
        log.debug("mallopt refused the heap-reuse settings; keeping the system allocator")
    return ok


def choose(num_params: Optional[int]) -> str:
    """'reuse' or 'system' for a model of `num_params` parameters (None: unknown)."""
    if num_params is not None and int(num_params) > AUTO_MAX_PARAMS:
        return "system"
    return "reuse"


def release() -> bool:
    """Return the heap's free memory to the OS (glibc's `malloc_trim(0)`) when the policy
    is in effect; a job boundary, not a per-step call. Returns whether memory was freed."""
    if not _applied:
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
