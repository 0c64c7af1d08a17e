"""A tiny SFT run leaves TensorBoard event files that agree with its metrics.jsonl."""

import glob
import math
import os

import numpy as np
import pytest

from latentr3_jax.config import default_config_file, parse_config
from latentr3_jax.train import runs
from latentr3_jax.train.sft import train_sft

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

SKIPPED = ("step", "time", "split", "batch")


def _expected(records):
    """{tag: [(step, float32 value, time)]} from the metrics lines that carry a curve."""
    out = {}
    for r in records:
        if "event" in r or not isinstance(r.get("step"), int) or "split" not in r:
            continue
        for k, v in r.items():
            if k in SKIPPED or isinstance(v, (bool, str, dict, list)) or v is None:
                continue
            out.setdefault(f"{r['split']}/{k}", []).append(
                (r["step"], float(np.float32(v)), r["time"]))
    return out


def test_sft_run_writes_event_files_matching_metrics(tmp_path):
    run = tmp_path / "run"
    cfg, _ = parse_config(["--config", default_config_file("sft_tiny.py"),
                           f"--config.workdir={run}", "--config.data.max_train_rows=32",
                           "--config.data.max_eval_rows=8", "--config.sft.epochs=2",
                           "--config.sft.log_every=1"])
    train_sft(cfg, progress=False)
    files = glob.glob(str(run / runs.TENSORBOARD / "events.out.tfevents.*"))
    assert len(files) == 1, files

    expected = _expected(runs.read_metrics(str(run)))
    assert {"train/loss", "train/grad_norm", "train/lr", "valid/loss"} <= set(expected)
    acc = event_accumulator.EventAccumulator(str(run / runs.TENSORBOARD),
                                             size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, want in expected.items():
        got = acc.Scalars(tag)
        assert [(e.step, e.value) for e in got] == [(s, v) for s, v, _ in want], tag
        assert all(math.isclose(e.wall_time, t, abs_tol=1e-3) for e, (_, _, t) in zip(got, want))
    train_steps = [s for s, _, _ in expected["train/loss"]]
    assert train_steps == list(range(1, len(train_steps) + 1)) and len(train_steps) >= 4
    assert os.path.exists(run / runs.METRICS)
