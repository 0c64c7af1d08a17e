"""Graceful stop on SIGTERM / SIGINT: finish the current step, save, exit."""

from __future__ import annotations

import signal
import threading
from typing import Optional


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

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: Optional[str] = None
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
        return self.received is not None
