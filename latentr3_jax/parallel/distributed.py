"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

Where the settings come from, first match wins per field:
  1. the config: `distributed.coordinator_address`, `num_processes` (> 0), `process_id` (>= 0);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. jax's own cluster detection (Cloud TPU slices, Slurm, ...) for whatever is still unset.
With neither an address nor a multi-host TPU slice, the run stays single-process.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from latentr3_jax.errors import InputError

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _multi_host_tpu() -> bool:
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} is not an integer") from None


def initialize_kwargs(dist_cfg) -> Optional[dict]:
    """The `jax.distributed.initialize` keyword arguments the config and environment give,
    or None when they describe no multi-process run."""
    addr = dist_cfg.coordinator_address.strip() or os.environ.get(ENV_ADDRESS, "").strip()
    num = int(dist_cfg.num_processes)
    if num <= 0:
        num = _env_int(ENV_NUM_PROCESSES) or 0
    pid = int(dist_cfg.process_id)
    if pid < 0:
        env_pid = _env_int(ENV_PROCESS_ID)
        pid = -1 if env_pid is None else env_pid
    if not addr and not _multi_host_tpu():
        if num > 1 or pid > 0:
            raise InputError(f"distributed: num_processes={num}, process_id={pid} but no "
                             f"coordinator address (set distributed.coordinator_address or "
                             f"{ENV_ADDRESS})")
        return None
    if num > 0 and pid >= num:
        raise InputError(f"distributed: process_id {pid} is outside 0..{num - 1}")
    kwargs = {}
    if addr:
        kwargs["coordinator_address"] = addr
    if num > 0:
        kwargs["num_processes"] = num
    if pid >= 0:
        kwargs["process_id"] = pid
    return kwargs


def maybe_initialize(dist_cfg) -> bool:
    """Join a multi-process run when the config or environment describes one (see the
    module docstring). Safe to call again: returns True if jax.distributed is initialized."""
    if jax.distributed.is_initialized():
        return True
    kwargs = initialize_kwargs(dist_cfg)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True
