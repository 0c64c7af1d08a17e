"""Crash resume: `latentr3 sft` and `latentr3 grpo` killed with SIGKILL at random steps
(several times, restarted with the same command each time) end with exactly the
parameters of an uninterrupted run of the same command."""

import concurrent.futures
import os

import jax
import numpy as np
import pytest


import _crash_helpers as ch
from latentr3_jax.train import runs

pytestmark = pytest.mark.slow

TIMEOUT = 420.0   # per process; the machine may be busy
KILLS = 3
SFT_STEPS = 24    # 48 train rows / batch 4 = 12 steps per epoch, 2 epochs
GRPO_BATCHES = 12

COMMON = ["--config", os.path.join(ch.REPO, "configs", "sft_tiny.py"),
          "--config.data.synthetic.num_items=40", "--config.data.synthetic.num_users=60",
          "--config.data.max_train_rows=48", "--config.data.max_eval_rows=8",
          "--config.tokenizer.vocab_size=300", "--config.model.num_layers=1"]


def sft_args(workdir):
    return ["sft", *COMMON, f"--config.workdir={workdir}", "--config.sft.batch_size=4",
            "--config.sft.epochs=2", "--config.sft.patience=5", "--config.sft.checkpoint_every=1",
            "--config.sft.log_every=1", "--config.sft.keep_checkpoints=2"]


def grpo_args(workdir, init_from):
    return ["grpo", *COMMON, f"--config.workdir={workdir}", f"--config.grpo.init_from={init_from}",
            "--config.grpo.group_size=4", "--config.grpo.prompts_per_batch=4",
            f"--config.grpo.max_steps={GRPO_BATCHES}", "--config.grpo.warmup_steps=2",
            "--config.grpo.learning_rate=1e-2", "--config.grpo.checkpoint_every=1",
            "--config.grpo.log_every=1", "--config.grpo.evaluate=False"]


def _full_and_killed(make_args, root, key, total, seed):
    """Run the command uninterrupted and, concurrently, with KILLS random SIGKILLs."""
    full_dir, killed_dir = os.path.join(root, "full"), os.path.join(root, "killed")
    os.makedirs(full_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        full = pool.submit(lambda: ch.finish(ch.start(make_args(full_dir),
                                                      full_dir + ".log"), TIMEOUT))
        rc, kills = ch.run_with_kills(make_args(killed_dir), killed_dir, key, total, rng,
                                      KILLS, TIMEOUT, cache_dir=os.path.join(root, "xla_cache"))
        full_rc = full.result()
    assert full_rc == 0, ch.read_log(full_dir)[-3000:]
    assert rc == 0, ch.read_log(killed_dir)[-3000:]
    return full_dir, killed_dir, kills


def _assert_same_params(a_dir, b_dir):
    a = runs.load_run(a_dir, which="latest")
    b = runs.load_run(b_dir, which="latest")
    assert a.step == b.step
    la, ta = jax.tree.flatten_with_path(jax.device_get(a.params))
    lb, tb = jax.tree.flatten_with_path(jax.device_get(b.params))
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))
    return a


def _check_kills(kills, killed_dir, key, total):
    # the kills really interrupted the run, and every restart resumed from a checkpoint
    # (a kill may land after the last step's record, while its checkpoint is being written)
    assert len(kills) == KILLS, kills
    assert all(k["seen_at_kill"] is not None for k in kills), kills
    print(f"\n{os.path.basename(os.path.dirname(killed_dir))} kills:", *kills, sep="\n  ")
    steps = ch.train_records(killed_dir, key)
    assert set(steps) == set(range(1, total + 1)), steps
    # each restart went on right after the newest checkpoint complete at the kill
    for k in kills:
        newest = max(k["checkpoints_at_kill"], default=0)
        if k["records_at_kill"] == len(steps):  # nothing left to train after this kill
            assert newest == total, (k, steps)
            continue
        assert steps[k["records_at_kill"]] == newest + 1, (k, steps)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("crash_sft"))
    return _full_and_killed(sft_args, root, "step", SFT_STEPS, seed=1234)


def test_sft_survives_sigkill(sft_runs):
    full_dir, killed_dir, kills = sft_runs
    _check_kills(kills, killed_dir, "step", SFT_STEPS)
    art = _assert_same_params(full_dir, killed_dir)
    assert art.step == SFT_STEPS
    # the best (validation) checkpoint agrees too
    best_a = jax.device_get(runs.load_run(full_dir, which="best").params)
    best_b = jax.device_get(runs.load_run(killed_dir, which="best").params)
    for x, y in zip(jax.tree.leaves(best_a), jax.tree.leaves(best_b)):
        np.testing.assert_array_equal(x, y)


def test_grpo_survives_sigkill(sft_runs, tmp_path):
    init_from = sft_runs[0]
    full_dir, killed_dir, kills = _full_and_killed(
        lambda w: grpo_args(w, init_from), str(tmp_path), "batch", GRPO_BATCHES, seed=99)
    _check_kills(kills, killed_dir, "batch", GRPO_BATCHES)
    art = _assert_same_params(full_dir, killed_dir)
    assert art.meta["trainer"]["batches"] == GRPO_BATCHES
    # LR-GRPO moved LatentRATT away from the SFT weights (the comparison is not vacuous)
    sft = jax.device_get(runs.load_run(init_from, which="latest").params["latent"])
    moved = jax.device_get(art.params["latent"])
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(sft), jax.tree.leaves(moved)))
