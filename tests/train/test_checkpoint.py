"""Checkpoints: exact resume, other meshes, interrupted and damaged writes, wrong models."""

import glob
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax.config import default_config_file, parse_config
from latentr3_jax.errors import InputError
from latentr3_jax.parallel import make_mesh
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train.sft import train_sft
from latentr3_jax.train import fingerprint, runs

from _sft_helpers import make_tx, new_state, tiny_model

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helper modules


def tiny_cfg(workdir, *overrides):
    cfg, _ = parse_config(["--config", default_config_file("sft_tiny.py"),
                           f"--config.workdir={workdir}", "--config.data.max_train_rows=40",
                           "--config.data.max_eval_rows=8", "--config.sft.checkpoint_every=100",
                           *overrides])
    return cfg


def _params(run_dir, which="latest"):
    return jax.device_get(runs.load_run(run_dir, which).params)


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    full = train_sft(tiny_cfg(tmp_path / "a"), progress=False)
    part = train_sft(tiny_cfg(tmp_path / "b"), progress=False, stop_after=2)
    assert not part["finished"] and part["steps"] == 2
    resumed = train_sft(tiny_cfg(tmp_path / "b"), progress=False)
    assert resumed["start_step"] == 2 and resumed["steps"] == full["steps"] > 2
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(a, b)
    assert resumed["best_valid_loss"] == pytest.approx(full["best_valid_loss"], rel=1e-6)
    # a finished run started again does nothing and changes nothing
    again = train_sft(tiny_cfg(tmp_path / "b"), progress=False)
    assert again["start_step"] == again["steps"] == full["steps"]
    # a different model in the same run directory is refused
    with pytest.raises(InputError, match="different model"):
        train_sft(tiny_cfg(tmp_path / "b", "--config.model.hidden_size=64"), progress=False)


@pytest.fixture()
def saved(tmp_path):
    """A Checkpointer holding steps 1, 2, 3 of a tiny state (params offset by the step)."""
    config = tiny_model()
    tx, _ = make_tx()
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    state, sh = new_state(config, tx, mesh)
    fp = fingerprint.make_fingerprint(config, num_thoughts=1, latent_mode="ratt")
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), fingerprint=fp, keep=5)
    for s in (1, 2, 3):
        st = state.replace(step=jnp.int32(s), params=jax.tree.map(lambda x: x + s, state.params))
        ck.save(st, {"epoch": 0, "step": s})
    ck.wait()
    abstract = jax.eval_shape(lambda x: x, state)
    yield ck, abstract, sh, state, fp, tmp_path / "ck" / "latest"
    ck.close()


def _restored_step(ck, abstract, sh):
    state, data_state, meta = ck.restore_latest(abstract, sh)
    assert data_state["step"] == int(state.step) == meta["step"]
    return int(state.step), state


def test_interrupted_write_is_never_picked(saved):
    ck, abstract, sh, state0, _, latest = saved
    # an Orbax temporary directory (write in flight when the process died)
    tmp = latest / "7.orbax-checkpoint-tmp-1234567"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "junk").write_bytes(b"\0" * 10)
    # a step directory whose write stopped before Orbax finalized it
    (latest / "9" / "params").mkdir(parents=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step, state = _restored_step(ck, abstract, sh)
    assert step == 3
    np.testing.assert_allclose(jax.device_get(state.params["final_norm"]["scale"]),
                               jax.device_get(state0.params["final_norm"]["scale"]) + 3)
    assert not any("/7" in str(x.message) for x in w)


def test_saved_json_is_taken_at_the_call(saved):
    """The trainer dicts go on changing right after `save` returns, while Orbax writes in the
    background: each checkpoint must hold the values of its own step (a restart from step k
    with the counters of step k+1 skips a batch)."""
    ck, abstract, sh, state0, _, latest = saved
    handed = []   # what Orbax was given to write, read after the caller's changes
    real_save = ck.latest.save

    def spy(step, args, **kw):
        handed.append((step, args))
        return real_save(step, args=args, **kw)

    ck.latest.save = spy
    for s in range(4, 12):
        trainer = {"batches": s, "history": [s]}
        data = {"epoch": 0, "step": s}
        st = state0.replace(step=jnp.int32(s))
        ck.save(st, data, extra={"trainer": trainer})
        trainer["batches"] += 1000
        trainer["history"].append(-1)
        data["step"] += 1000
    ck.wait()
    assert [s for s, _ in handed] == list(range(4, 12))
    for s, args in handed:
        assert args["meta"].item["trainer"] == {"batches": s, "history": [s]}
        assert args["data"].item["step"] == s
    kept = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert kept == [7, 8, 9, 10, 11]  # keep=5
    for s in kept:
        meta = json.loads((latest / str(s) / "meta" / "metadata").read_text())
        assert meta["trainer"] == {"batches": s, "history": [s]}, (s, meta)
        assert json.loads((latest / str(s) / "data" / "metadata").read_text())["step"] == s


def test_corrupted_latest_falls_back_with_warning(saved):
    ck, abstract, sh, _, _, latest = saved
    files = [f for f in glob.glob(str(latest / "3" / "params" / "**"), recursive=True)
             if os.path.isfile(f) and "/d/" in f]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))
    with pytest.warns(ckpt_lib.CheckpointWarning, match=r"latest/3 is damaged.*falling back to step 2"):
        step, _ = _restored_step(ck, abstract, sh)
    assert step == 2


def test_damaged_meta_falls_back(saved):
    ck, abstract, sh, _, _, latest = saved
    (latest / "3" / "meta" / "metadata").write_text("{not json")
    with pytest.warns(ckpt_lib.CheckpointWarning, match="latest/3 is damaged"):
        step, _ = _restored_step(ck, abstract, sh)
    assert step == 2


def test_different_model_or_tokenizer_is_refused(saved, tmp_path):
    ck, abstract, sh, _, fp, _ = saved
    other = fingerprint.make_fingerprint(tiny_model(hidden=64), num_thoughts=1, latent_mode="ratt")
    ck2 = ckpt_lib.Checkpointer(str(tmp_path / "ck"), fingerprint=other)
    with pytest.raises(InputError, match=r"different model or tokenizer: .*model\.hidden_size"):
        ck2.restore_latest(abstract, sh)
    ck2.close()
    fp_tok = dict(fp, tokenizer={"vocab_size": 97, "probe_hash": "abc"})
    ck3 = ckpt_lib.Checkpointer(str(tmp_path / "ck"), fingerprint=fp_tok)
    with pytest.raises(InputError, match="tokenizer"):
        ck3.restore_latest(abstract, sh)
    ck3.close()


MESH_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import checkpoint as ckpt_lib, fingerprint
    from _sft_helpers import make_tx, new_state, tiny_model
    config = tiny_model(vocab=96)
    tx, _ = make_tx()
    fp = fingerprint.make_fingerprint(config)
    src = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    state, _ = new_state(config, tx, src, seed=3)
    ck = ckpt_lib.Checkpointer(sys.argv[2], fingerprint=fp)
    ck.save(state, {"epoch": 0, "step": 0}); ck.wait()
    want = jax.device_get(state)
    for shape in [(1, 8, 1), (2, 2, 2), (1, 1, 1)]:
        devs = jax.devices()[:1] if shape == (1, 1, 1) else None
        mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devs)
        fresh, sh = new_state(config, tx, mesh, seed=4)
        got, _, _ = ck.restore_latest(jax.eval_shape(lambda x: x, fresh), sh)
        for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
        q = got.params["layers"]["attn"]["q"]["kernel"]
        assert q.sharding == sh.params["layers"]["attn"]["q"]["kernel"], shape
        print("OK", shape, q.sharding.spec)
    ck.close()
""")


def test_restore_onto_a_different_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, HERE, str(tmp_path / "ck")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK") == 3


def test_best_is_written_before_a_later_latest(saved):
    """The trainer state in a latest checkpoint names the best step; that best checkpoint
    must be complete before the latest one is even started (else a kill in between leaves a
    resume pointing at a best that never landed)."""
    ck, abstract, sh, state0, _, latest = saved
    events = []
    st = state0.replace(step=jnp.int32(7))
    ck.save_best(st, 0.5)    # returns with the write in flight
    real_wait, real_save = ck.best.wait_until_finished, ck.latest.save
    ck.best.wait_until_finished = lambda: (events.append("best finished"), real_wait())[1]
    ck.latest.save = lambda step, **kw: (events.append(f"latest {step} started"),
                                         real_save(step, **kw))[1]
    ck.save(st, {"epoch": 0, "step": 7}, extra={"trainer": {"best_step": 7}})
    ck.wait()
    assert events.index("best finished") < events.index("latest 7 started"), events
    assert 7 in ck.best.all_steps()
