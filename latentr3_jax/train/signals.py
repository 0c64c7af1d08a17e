"""Graceful stop on SIGTERM / SIGINT: finish the current step, save, exit.

On a multi-process run the signal may reach one host only (or the hosts at different
steps); a host that stopped alone would leave the others waiting in the next step's
collectives. So the hosts agree: every `sync_every` steps (the same steps on every host)
they exchange their flags, and all of them stop at that step if any one was signalled."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequested(Exception):
    """Raised after the run saved its state because a stop signal arrived."""

    def __init__(self, signame: str, step: int, resume_hint: str):
        self.signame, self.step = signame, step
        super().__init__(f"stopped by {signame} after step {step}; checkpoint saved. "
                         f"To resume, run the same command again: {resume_hint}")


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag checked at step boundaries.

    A second signal while the first is being handled restores the default behaviour, so
    pressing Ctrl-C twice still kills the process.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), *, sync_every: int = 1,
                 process_count: Optional[int] = None):
        self.signals = signals
        self.received: Optional[str] = None
        self.sync_every = max(int(sync_every), 1)
        self._process_count = process_count
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.received is not None:
            for s, h in self._old.items():
                signal.signal(s, h)
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.received is not None

    def should_stop(self, step: int) -> bool:
        """Whether the run stops after `step`: on one process, as soon as a signal arrived;
        on several, at the next multiple of `sync_every` once any process received one
        (every process must call this at every step). `received` then names the signal,
        also on the hosts that did not get it."""
        if self._process_count is None:
            self._process_count = jax.process_count()
        if self._process_count <= 1:
            return self.requested
        if step % self.sync_every:
            return False
        mine = int(signal.Signals[self.received]) if self.received else 0
        codes = np.asarray(multihost_utils.process_allgather(np.int32(mine))).reshape(-1)
        if not codes.any():
            return False
        if self.received is None:
            self.received = signal.Signals(int(codes.max())).name
        return True
