"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment."""

from __future__ import annotations

import os

import jax


def _cluster_env() -> bool:
    """A coordinator address in the environment, or a multi-host TPU slice."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def maybe_initialize(dist_cfg) -> bool:
    """Join a multi-process run when the config or environment describes one.

    With `coordinator_address` set, the config gives the address, process count and id;
    otherwise, if the environment describes a cluster (JAX_COORDINATOR_ADDRESS, or a
    multi-host TPU slice), jax auto-detects them. Returns True if initialized.
    """
    if jax.distributed.is_initialized():
        return True
    addr = str(dist_cfg.get("coordinator_address", "") or "")
    if addr:
        kwargs = {"coordinator_address": addr}
        if int(dist_cfg.get("num_processes", 0)) > 0:
            kwargs["num_processes"] = int(dist_cfg.num_processes)
        if int(dist_cfg.get("process_id", -1)) >= 0:
            kwargs["process_id"] = int(dist_cfg.process_id)
        jax.distributed.initialize(**kwargs)
        return True
    if _cluster_env():
        jax.distributed.initialize()
        return True
    return False
