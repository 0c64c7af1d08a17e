"""What every benchmark script shares: import paths, the CDs data location, dtype names,
step timing, the machine description, engine subprocesses and the result file.

A script in bench/ imports it as `import common` (its own folder is on sys.path when it
runs as `python bench/bench_X.py`); importing it puts the repository root on sys.path so
`latentr3_jax` imports without installing the package. JAX and torch are imported only
inside the functions that need them: a worker process first sets what must precede them
(the CPU allocator policy, OMP_WAIT_POLICY) and runs one engine, not both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from latentr3_jax.utils.atomic import atomic_write_text  # noqa: E402  (needs ROOT on the path)
from latentr3_jax.utils.jsonio import jsonable  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CDS = os.path.join(ROOT, "..", "shared", "data", "amazon18", "CDs_and_Vinyl")
DTYPES = ("float32", "bfloat16")


def have_cds() -> bool:
    """Whether the real CDs_and_Vinyl data (../shared) is there."""
    return os.path.exists(os.path.join(CDS, "info.txt"))


# --------------------------------------------------------------------------- precision


def jax_dtype(name: str):
    """'float32' / 'bfloat16' -> the JAX compute dtype (bfloat16: mixed precision)."""
    import jax.numpy as jnp  # not at the top: see the module docstring
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def torch_dtype(name: str):
    import torch  # optional, heavy: only the torch side needs it
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast_dtype(name: str):
    """torch.autocast dtype for `name`: bfloat16, or None (float32 throughout)."""
    return torch_dtype(name) if name == "bfloat16" else None


# --------------------------------------------------------------------------- timing


def time_steps(fn: Callable[[int], object], steps: int, warmup: int = 0) -> list:
    """Call fn(0..warmup-1) untimed, then fn(0..steps-1) timed one by one; the seconds of
    each timed call. `fn` must wait for its result (block_until_ready, a host value)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times


def step_stats(times: Sequence[float], tokens_per_step: float) -> dict:
    """Median step (the machine is shared: the median resists interference), the fastest
    one, and tokens per second at the median."""
    med = float(np.median(times))
    return {"step_s": med, "min_s": float(np.min(times)),
            "tokens_per_s": float(tokens_per_step / med)}


def batch_tokens(batches: Sequence[dict]) -> float:
    """Mean real (unpadded) prompt + target tokens of a prompt/target batch."""
    return float(np.mean([b["prompt_mask"].sum() + b["target_mask"].sum() for b in batches]))


def machine() -> dict:
    """What ran the JAX side: CPU count, load average now, JAX version, backend, device."""
    import jax  # not at the top: see the module docstring
    return {"cpus": os.cpu_count(), "load_avg": list(os.getloadavg()), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}


# --------------------------------------------------------------------------- processes, files


def emit(result: dict) -> None:
    """A worker's answer to `run_worker`: one RESULT line on stdout."""
    print("RESULT" + json.dumps(jsonable(result)))


def run_worker(script: str, args: Sequence[str], env: Optional[dict] = None,
               stderr_tail: int = 600) -> dict:
    """Run `python script args` (one engine per process: XLA flags, allocators and thread
    pools are per process) and return what it `emit`ted, or {'error': last stderr line}."""
    out = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr[-stderr_tail:])
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def write_result(path: str, result: dict, indent: int = 2) -> str:
    """Write the result JSON atomically (keys in the order the script built them)."""
    atomic_write_text(path, json.dumps(jsonable(result), indent=indent) + "\n")
    print(f"wrote {path}")
    return path
