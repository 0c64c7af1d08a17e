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
trimming off outright (`M_TRIM_THRESHOLD=-1`): when the heap's layout lets the next step
reuse the block, nothing is faulted any more, but in other runs the heap grew step after
step (to 23 GB on a 24 GB machine, bench/results/step_faults_smollm2-135m.json), so it is
experimental and opt-in. What large models get instead is malloc on transparent huge
pages (`hugepage_env` below: the command line restarts itself with the glibc tunable),
which leaves the faults in place but makes them 512 times fewer. `release()` (glibc's
`malloc_trim`) returns the free memory at a job's end; the training loop and the
evaluator call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
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


# ----------------------------------------------------------------- transparent huge pages
#
# glibc serves the big step buffer of a large model from a fresh mmap every step (the
# `system` policy above), and the kernel faults it in 4 KiB at a time. glibc 2.35+ can ask
# for transparent huge pages on its own memory (MADV_HUGEPAGE on every mmap'd chunk and on
# the heap), but only through the GLIBC_TUNABLES environment variable, read once when the
# process starts. So `latentr3`, run from the command line, restarts itself once with
# `glibc.malloc.hugetlb=1` added when this pays: at SmolLM2-135M's shape the fp32 plain
# step then faults 3.4 thousand pages instead of 1.38 million and ran 4.61 s against 6.75 s
# alone (bench/step_faults.py, bench/results/step_faults_smollm2-135m.json). On a VM with
# free page reporting, memory freed during an idle spell goes back to the host and the
# step after the spell pays more for it (9.20 s after an 8 s pause); steps back to back,
# as in a training loop, do not.

HUGEPAGES_ENV = "LATENTR3_CPU_HUGEPAGES"
HUGEPAGE_MODES = ("auto", "on", "off")
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED_ENV = "LATENTR3_RESTARTED_FOR_HUGEPAGES"   # set in the restarted process
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/accel0", "/dev/kfd", "/dev/vfio/0")


def thp_setting(path: str = THP_SYSFS) -> str:
    """The kernel's transparent-huge-page line as it reads, e.g. 'always [madvise] never'
    ('' unknown)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def thp_mode(path: str = THP_SYSFS) -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'; '' unknown)."""
    chosen = [w[1:-1] for w in thp_setting(path).split() if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else ""


def _glibc_version() -> tuple:
    name, version = platform.libc_ver()
    if name != "glibc":
        return ()
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return ()


def hugepage_env(num_params: Optional[int], environ=None, *, idle: bool = False,
                 thp: Optional[str] = None, glibc: Optional[tuple] = None,
                 accelerator: Optional[bool] = None) -> Optional[dict]:
    """The environment to restart the process with so that glibc's malloc asks for
    transparent huge pages, or None to carry on as is. Mode from $LATENTR3_CPU_HUGEPAGES:
    'off' never; 'on' whenever the system can ('madvise' THP mode, glibc 2.35 or newer);
    'auto' (default) also needs a model known to be above AUTO_MAX_PARAMS under the
    `system` heap policy, the size where it was measured to pay, and no accelerator (no
    NVIDIA, TPU or ROCm device file; JAX_PLATFORMS, if set, naming cpu) and a job that
    runs back to back (`idle`: a service that waits between requests, where freed huge
    pages cost more on a VM that hands them back to its host). Never when
    GLIBC_TUNABLES already sets glibc.malloc.hugetlb, or in a process restarted for it.
    `thp`, `glibc`, `accelerator`: the system's facts, read here unless given (tests)."""
    env = dict(os.environ if environ is None else environ)
    mode = env.get(HUGEPAGES_ENV, "auto").strip().lower()
    if mode not in HUGEPAGE_MODES:
        raise ValueError(f"{HUGEPAGES_ENV} must be one of {', '.join(HUGEPAGE_MODES)}, "
                         f"got {mode!r}")
    tunables = env.get("GLIBC_TUNABLES", "")
    if (mode == "off" or env.get(RESTARTED_ENV) or "glibc.malloc.hugetlb" in tunables):
        return None
    thp = thp_mode() if thp is None else thp
    glibc = _glibc_version() if glibc is None else glibc
    if thp != "madvise" or not glibc or glibc < (2, 35):
        # 'always' gives big mappings huge pages already; 'never' cannot
        if mode == "on":
            log.warning("%s=on: no effect here (transparent huge pages %r, glibc %s)",
                        HUGEPAGES_ENV, thp or "unknown",
                        ".".join(map(str, glibc)) or "absent")
        return None
    if mode == "auto":
        if accelerator is None:
            platforms = env.get("JAX_PLATFORMS", "")
            accelerator = ((bool(platforms) and "cpu" not in platforms.split(","))
                           or any(os.path.exists(p) for p in ACCELERATOR_DEVICES))
        heap = env.get(ENV, "auto").strip().lower()
        if (accelerator or idle or num_params is None or int(num_params) <= AUTO_MAX_PARAMS
                or heap not in ("auto", "system")):
            return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE
    env[RESTARTED_ENV] = "1"
    return env

