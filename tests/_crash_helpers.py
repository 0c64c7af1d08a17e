"""Start `latentr3` training commands as subprocesses and SIGKILL them at chosen steps."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(cache_dir=None) -> dict:
    """Environment of the training subprocesses. With `cache_dir`, XLA executables are
    kept in a persistent compilation cache so restarts skip recompiling (same binaries)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start(args, log_path, cache_dir=None):
    """`python -m latentr3_jax ARGS` in its own process group, output into `log_path`."""
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "latentr3_jax", *args], cwd=REPO,
                            env=cli_env(cache_dir), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc._log = log  # closed by finish()
    return proc


def finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc._log.close()


def progress(run_dir, key: str) -> int:
    """The highest `key` ('step' or 'batch') among the training records of metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    best = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by a kill
                    continue
                if rec.get("split") == "train" and key in rec:
                    best = max(best, int(rec[key]))
    except FileNotFoundError:
        pass
    return best


def train_records(run_dir, key: str) -> list:
    """`key` of every training record of metrics.jsonl, in file order (restarts included)."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("split") == "train" and key in rec:
                out.append(int(rec[key]))
    return out


def saves_in_flight(run_dir) -> list:
    """Orbax temporary step directories left by the kill (a save was being written)."""
    d = os.path.join(run_dir, "checkpoints", "latest")
    return sorted(x for x in os.listdir(d) if not x.isdigit()) if os.path.isdir(d) else []


def checkpoint_steps(run_dir) -> list:
    d = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def kill_at(proc, run_dir, key: str, target: int, extra_delay: float, timeout: float):
    """Wait until the run reports step >= target, sleep `extra_delay`, SIGKILL it.

    Returns the step seen at the kill, or None if the process ended by itself first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            finish(proc, 60)
            return None
        seen = progress(run_dir, key)
        if seen >= target:
            time.sleep(extra_delay)
            if proc.poll() is not None:
                finish(proc, 60)
                return None
            os.killpg(proc.pid, signal.SIGKILL)
            finish(proc, 60)
            return progress(run_dir, key)
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc, 60)
    raise TimeoutError(f"run {run_dir} did not reach {key} {target} in {timeout:.0f}s")


def run_with_kills(args, run_dir, key: str, total: int, rng, kills: int, timeout: float,
                   cache_dir=None):
    """Start the command, SIGKILL it at `kills` random steps (distinct, drawn from `rng`),
    restarting it after each kill, then let it finish. Returns (exit code, kill records)."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log")
    # one kill in each of `kills` equal stretches of the run: early, middle, late
    edges = np.linspace(1, total - 1, kills + 1).astype(int)
    targets = [int(rng.integers(lo, max(hi, lo + 1))) for lo, hi in zip(edges[:-1], edges[1:])]
    records = []
    for target in targets:
        before = progress(run_dir, key)
        target = max(target, before + 1)
        if target >= total:
            break
        delay = float(rng.uniform(0.0, 0.3))                 # lands anywhere in a step / save
        proc = start(args, log_path, cache_dir)
        seen = kill_at(proc, run_dir, key, target, delay, timeout)
        records.append({"target": target, "delay": round(delay, 3), "seen_at_kill": seen,
                        "checkpoints_at_kill": checkpoint_steps(run_dir),
                        "save_in_flight_at_kill": saves_in_flight(run_dir),
                        "records_at_kill": len(train_records(run_dir, key))})
        if seen is None:  # finished before the kill: nothing left to interrupt
            return proc.returncode, records
    proc = start(args, log_path, cache_dir)
    return finish(proc, timeout), records


def read_log(run_dir) -> str:
    path = os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
