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


def run_training_command(command: str, argv, train_fn):
    """Shared CLI wrapper of `latentr3 sft|grpo`: parse the config, train, map stops to exit codes.

    Returns (exit_code, summary or None). A stop signal exits 128 + signal number after
    the trainer saved; repeated non-finite steps exit 1; the resume hint is the command line.
    """
    import logging
    import shlex
    import signal as signal_mod
    import sys

    from latentr3_jax.configlib import parse_config
    from latentr3_jax.train.step import NonFiniteError

    cfg, _ = parse_config(argv)
    hint = f"latentr3 {command} " + " ".join(shlex.quote(a) for a in argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return 0, train_fn(cfg, progress=True, resume_hint=hint)
    except StopRequested as e:
        print(f"latentr3 {command}: {e}", file=sys.stderr)
        return 128 + int(getattr(signal_mod, e.signame, signal_mod.SIGTERM)), None
    except NonFiniteError as e:
        print(f"latentr3 {command}: error: {e}", file=sys.stderr)
        return 1, None
