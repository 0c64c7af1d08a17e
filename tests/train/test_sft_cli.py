"""`latentr3 sft` end to end on the synthetic dataset: run directory, SIGTERM, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from latentr3_jax.config import default_config_file, parse_config
from latentr3_jax.train import runs
from latentr3_jax.train.sft import train_sft
from latentr3_jax.train.step import NonFiniteError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(workdir, *extra):
    return [sys.executable, "-m", "latentr3_jax", "sft", "--config",
            os.path.join(REPO, "configs", "sft_tiny.py"), f"--config.workdir={workdir}",
            "--config.data.max_train_rows=48", "--config.data.max_eval_rows=8", *extra]


@pytest.mark.slow
def test_cli_sigterm_then_resume(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # epochs=4 -> 24 steps; stop it after the first logged step with SIGTERM
    proc = subprocess.Popen(_cli(run, "--config.sft.epochs=4", "--config.sft.log_every=1"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / runs.METRICS
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"split": "train"' in x for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "To resume, run the same command again: latentr3 sft" in err
    stopped_at = [r for r in runs.read_metrics(run) if r.get("event") == "stopped"][0]["step"]
    assert 1 <= stopped_at < 24
    for name in (runs.CONFIG, runs.MODEL_CONFIG, runs.TOKENIZER, runs.METRICS):
        assert (run / name).exists(), name

    proc = subprocess.run(_cli(run, "--config.sft.epochs=4", "--config.sft.log_every=1"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sft done: 24 steps" in proc.stdout
    recs = runs.read_metrics(run)
    train_steps = [r["step"] for r in recs if r.get("split") == "train"]
    assert train_steps == list(range(1, 25))  # every step logged once: resumed after `stopped_at`
    assert all(np.isfinite(r["loss"]) for r in recs if r.get("split") in ("train", "valid"))
    facts = json.loads((run / runs.MODEL_CONFIG).read_text())
    assert facts["num_thoughts"] == 1 and facts["latent_mode"] == "ratt"
    art = runs.load_run(str(run))
    assert art.which == "best" and "latent" in art.params
    assert art.tokenizer.vocab_size == art.model_config.vocab_size == art.thought_id + 1
    assert art.params["embed"]["embedding"].shape == (art.model_config.vocab_size, 32)


def test_non_finite_run_stops_with_a_clear_error(tmp_path):
    cfg, _ = parse_config(["--config", default_config_file("sft_tiny.py"),
                           f"--config.workdir={tmp_path / 'nan'}", "--config.data.max_train_rows=40",
                           "--config.data.max_eval_rows=0", "--config.sft.learning_rate=1e30",
                           "--config.sft.warmup_steps=0", "--config.sft.max_bad_steps=2",
                           "--config.sft.epochs=3", "--config.model.num_thoughts=0"])
    with pytest.raises(NonFiniteError, match="2 consecutive steps had a non-finite loss"):
        train_sft(cfg, progress=False)
    recs = runs.read_metrics(tmp_path / "nan")
    train = [r["skipped"] for r in recs if r.get("split") == "train"]
    # step 1's update (lr 1e30) is finite and blows the weights up; every later one is skipped
    assert train[0] == 0 and train[1:] and all(train[1:]), train
    # the run kept its last good state: a checkpoint was never written from a skipped step
    assert not (tmp_path / "nan" / "checkpoints" / "best").exists() or \
        not os.listdir(tmp_path / "nan" / "checkpoints" / "best")
