"""LR-GRPO training: reward rises, frozen LLM, exact resume, global-batch advantages on 8 devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latentr3_jax.model import decoder
from latentr3_jax.model import latent as latent_lib
from latentr3_jax.model.config import tiny_config
from latentr3_jax.train import grpo, optim
from latentr3_jax.train import state as state_lib
from latentr3_jax.train import step as step_lib
from latentr3_jax.train import fingerprint, runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _latent_sgd(params, lr):
    """SGD on the latent module only, the LLM frozen."""
    labels = jax.tree.map(lambda m: "train" if m else "freeze", optim.latent_only(params))
    return optax.multi_transform({"train": optax.sgd(lr), "freeze": optax.set_to_zero()},
                                 lambda _: labels)


def _tiny_problem(P=4, S=6, T=3):
    cfg = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                      num_kv_heads=2)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = decoder.init_params(cfg, k[0], std=0.1)
    params["latent"] = latent_lib.init_latent_params(cfg, k[1], std=0.1)
    batch = {"prompt_ids": jax.random.randint(k[2], (P, S), 0, 96),
             "prompt_mask": jnp.ones((P, S), jnp.int32).at[0, :2].set(0),
             "target_ids": jax.random.randint(k[3], (P, T), 0, 96),
             "target_mask": jnp.ones((P, T), jnp.int32),
             "valid": jnp.ones((P,), bool)}
    return cfg, params, batch


@pytest.mark.parametrize("estimator", ["reinforce", "pathwise"])
def test_reward_rises_and_llm_stays_frozen(estimator):
    """A fixed batch, 12 steps: the noise-free reward rises; only LatentRATT moves."""
    cfg, params, batch = _tiny_problem()
    s = grpo.GRPOSettings(group_size=8, sigma=1.5, estimator=estimator)
    mask = optim.latent_only(params)
    tx = optim.adamw(optax.constant_schedule(3e-2), trainable=lambda _: mask)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    rollout_fn = jax.jit(lambda p, b, r: grpo.make_rollout_fn(cfg, s)(p, {}, b, r))
    update = jax.jit(step_lib.make_step_fn(grpo.make_grpo_loss(cfg, s), tx))
    curve = []
    for i in range(12):
        step_in, m = rollout_fn(state.params, batch, jax.random.PRNGKey(100 + i))
        state, um = update(state, {**batch, **step_in})
        assert bool(um["finite"])
        curve.append(float(m["reward_eps0"]))
    assert curve[-1] > curve[0] + 0.2 * abs(curve[0]), curve
    for key in params:
        same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params[key], state.params[key])
        assert all(jax.tree.leaves(same)) == (key != "latent"), key


def test_ppo_one_iteration_ratio_is_one_and_matches_weighted_loglik():
    """With one iteration the stored log-probs equal the current ones: ratio 1 on every
    token, so the loss value is -sum A_k over target tokens and nothing is clipped."""
    cfg, params, batch = _tiny_problem()
    s = grpo.GRPOSettings(group_size=4, sigma=1.5, kl_beta=0.1)
    ref = {"latent": params["latent"]}   # the reference model is the starting point
    step_in, _ = jax.jit(lambda p, b, r: grpo.make_rollout_fn(cfg, s)(p, ref, b, r))(
        params, batch, jax.random.PRNGKey(3))
    np.testing.assert_allclose(step_in["ref_logp"], step_in["old_logp"], rtol=1e-6, atol=1e-6)
    loss_sum, count, aux = jax.jit(grpo.make_grpo_loss(cfg, s))(params, {**batch, **step_in}, None)
    m = np.repeat(np.asarray(batch["target_mask"]), 4, axis=0)
    adv = np.asarray(step_in["advantages"]).reshape(-1, 1)
    np.testing.assert_allclose(loss_sum, -(adv * m).sum(), rtol=1e-4, atol=1e-5)
    assert float(count) == m.sum() and float(aux["clipped"]) == 0.0
    assert abs(float(aux["kl_sum"])) < 1e-5     # KL to itself


def test_fused_step_matches_rollout_then_update_reinforce():
    """The single-pass step (batch used once) equals rollout + separate update, same noise.
    SGD, so the parameters compare the two gradients (see _sft_helpers.make_sgd_tx)."""
    cfg, params, batch = _tiny_problem()
    tx = _latent_sgd(params, 1e-2)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    s = grpo.GRPOSettings(group_size=4, estimator="reinforce")
    fused_state, fm = jax.jit(step_lib.make_step_fn(grpo.make_fused_loss(cfg, s), tx))(state, batch)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), grpo.ROLLOUT_SALT)
    step_in, rm = jax.jit(lambda p, b: grpo.make_rollout_fn(cfg, s)(p, {}, b, key))(state.params, batch)
    split_state, sm = jax.jit(step_lib.make_step_fn(grpo.make_grpo_loss(cfg, s), tx))(
        state, {**batch, **step_in})
    for k in ("reward_mean", "reward_eps0", "adv_std"):
        np.testing.assert_allclose(fm[k], rm[k], rtol=1e-5)
    np.testing.assert_allclose(fm["loss"], sm["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fm["grad_norm"], sm["grad_norm"], rtol=1e-4)
    moved = False
    for a, b, p in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(split_state.params),
                       jax.tree.leaves(params)):
        da, db = np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)
        # rounding differs between the two graphs at a few 1e-6 of the largest update; a
        # different estimator would differ at the scale of the updates themselves
        np.testing.assert_allclose(da, db, rtol=1e-4, atol=2e-5 * max(np.abs(db).max(), 1e-12))
        moved |= not np.array_equal(a, p)
    assert moved


# --------------------------------------------------------------------------- full runs


def _grpo_cfg(workdir, sft_dir, **over):
    from latentr3_jax.config import base_config
    c = base_config()
    c.workdir = str(workdir)
    c.dataset_dir = str(os.path.join(os.path.dirname(str(sft_dir)), "synthetic"))
    c.data.synthetic.num_items = 40
    c.data.synthetic.num_users = 60
    c.data.buckets = (96,)
    c.data.target_buckets = (24,)
    c.data.max_target_len = 24
    c.data.max_train_rows = 32
    c.data.max_eval_rows = 0
    c.tokenizer.vocab_size = 300
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 1
    c.grpo.init_from = str(sft_dir)
    c.grpo.group_size = 4
    c.grpo.prompts_per_batch = 4
    c.grpo.max_steps = 4
    c.grpo.warmup_steps = 1
    c.grpo.learning_rate = 1e-2
    c.grpo.log_every = 3   # metrics buffered over steps whose state was donated since
    c.grpo.checkpoint_every = 100
    c.grpo.evaluate = False
    for k, v in over.items():
        sec, name = k.split(".")
        c[sec][name] = v
    return c


def _make_sft_run(run_dir, cfg):
    """A run directory as `latentr3 sft` leaves it (untrained weights are enough here)."""
    from latentr3_jax import data
    from latentr3_jax.train import checkpoint as ckpt_lib, runs, setup
    ds = data.load_dataset(cfg)
    tok = data.train_tokenizer(data.tokenizer_corpus(ds, cfg.data.template),
                               int(cfg.tokenizer.vocab_size))
    model_config = setup.scratch_config(cfg, tok)
    params = setup.init_fn(cfg, model_config)(jax.random.PRNGKey(0))
    fp = fingerprint.make_fingerprint(model_config, tok, num_thoughts=1, latent_mode="ratt")
    runs.prepare_run_dir(str(run_dir), cfg, model_config, tok, num_thoughts=1,
                         latent_mode="ratt", fingerprint=fp)
    ck = ckpt_lib.Checkpointer(os.path.join(str(run_dir), runs.CHECKPOINTS), fingerprint=fp)
    ck.save(state_lib.new_state(params, optax.identity(), jax.random.PRNGKey(0)))
    ck.wait()
    ck.close()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    sft_dir = root / "sft"
    _make_sft_run(sft_dir, _grpo_cfg(sft_dir, sft_dir))
    return sft_dir


def test_resume_is_exact(sft_run, tmp_path):
    from latentr3_jax.train import checkpoint as ckpt_lib, runs
    full = grpo.train_grpo(_grpo_cfg(tmp_path / "full", sft_run), progress=False)
    assert full["finished"] and full["steps"] == 4
    part = grpo.train_grpo(_grpo_cfg(tmp_path / "part", sft_run), progress=False, stop_after=2)
    assert not part["finished"] and part["steps"] == 2
    rest = grpo.train_grpo(_grpo_cfg(tmp_path / "part", sft_run), progress=False)
    assert rest["finished"] and rest["start_step"] == 2
    a = runs.load_run(str(tmp_path / "full"), which="latest").params
    b = runs.load_run(str(tmp_path / "part"), which="latest").params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    sft = runs.load_run(str(sft_run), which="latest").params
    assert not np.array_equal(a["latent"]["q"]["kernel"], sft["latent"]["q"]["kernel"])
    np.testing.assert_array_equal(a["layers"]["mlp"]["up"]["kernel"],
                                  sft["layers"]["mlp"]["up"]["kernel"])
    recs = [r for r in runs.read_metrics(str(tmp_path / "part")) if r.get("split") == "train"]
    full_recs = [r for r in runs.read_metrics(str(tmp_path / "full")) if r.get("split") == "train"]
    assert [r["batch"] for r in recs] == [1, 2, 3, 4]
    for r, f in zip(recs, full_recs):
        for key in ("reward_mean", "reward_eps0", "adv_std", "adv_max", "loss", "grad_norm",
                    "clip_frac", "lr"):
            assert r[key] == f[key], key


def test_grpo_cli_rejects_missing_init(tmp_path):
    from latentr3_jax import cli
    assert cli.main(["grpo", "--config.workdir=" + str(tmp_path)]) == 2


EIGHT_DEVICES = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import json, jax, jax.numpy as jnp, numpy as np, optax, ml_collections
    from latentr3_jax.model import decoder, latent as latent_lib
    from latentr3_jax.model.config import tiny_config
    from latentr3_jax.parallel import mesh as mesh_lib
    from latentr3_jax.train import grpo, optim, setup, state as state_lib
    assert jax.device_count() == 8
    cfg = tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                      num_kv_heads=2)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = decoder.init_params(cfg, k[0], std=0.1)
    params["latent"] = latent_lib.init_latent_params(cfg, k[1], std=0.1)
    P, S, T = 16, 6, 3
    rng = np.random.default_rng(0)
    batch = {"prompt_ids": rng.integers(0, 96, (P, S)).astype(np.int32),
             "prompt_mask": np.ones((P, S), np.int32),
             "target_ids": rng.integers(0, 96, (P, T)).astype(np.int32),
             "target_mask": np.ones((P, T), np.int32), "valid": np.ones((P,), bool)}
    batch["prompt_mask"][::3, :2] = 0
    batch["target_mask"][::2, 2] = 0
    out = {}
    for name, devices, micro in (("one", jax.devices()[:1], 1), ("eight", jax.devices(), 1),
                                 ("eight_accum", jax.devices(), 2)):
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                                  devices=devices)
        s = grpo.GRPOSettings(group_size=4, sigma=1.5, num_micro_batches=micro)
        # SGD: parameters after the step compare gradients, not Adam's rounding amplifier
        labels = jax.tree.map(lambda m: "train" if m else "freeze", optim.latent_only(params))
        tx = optax.multi_transform({"train": optax.sgd(1e-2), "freeze": optax.set_to_zero()},
                                   lambda _: labels)
        axes = setup.params_axes(cfg, params)
        state, sh = state_lib.create_sharded_state(None, axes, tx, jax.random.PRNGKey(5), mesh,
                                                   params=params)
        step = grpo.GRPOStep(cfg, s, tx, mesh, sh)
        state, m = step(state, None, batch)
        rec = {k: float(v) for k, v in jax.device_get(m).items() if np.ndim(v) == 0}
        rec["latent_q"] = (np.asarray(state.params["latent"]["q"]["kernel"])
                           - np.asarray(params["latent"]["q"]["kernel"])).ravel()[:64].tolist()
        out[name] = rec
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_use_the_global_batch():
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    one = res["one"]
    for name in ("eight", "eight_accum"):
        other = res[name]
        for key in ("reward_mean", "reward_eps0", "adv_mean", "adv_std", "adv_max", "loss",
                    "grad_norm", "tokens"):
            np.testing.assert_allclose(other[key], one[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} {key}")
        assert np.abs(one["latent_q"]).max() > 0   # the step moved the latent
        np.testing.assert_allclose(other["latent_q"], one["latent_q"], rtol=1e-4,
                                   atol=1e-6 * np.abs(one["latent_q"]).max())


def test_non_finite_steps_stop_with_a_clear_error(sft_run, tmp_path):
    """A learning rate that blows the latent up: the non-finite steps are skipped (never
    applied), and after grpo.max_bad_steps of them in a row the run stops, naming the last
    good checkpoint, which holds finite weights."""
    from latentr3_jax.train import checkpoint as ckpt_lib, runs
    from latentr3_jax.train.step import NonFiniteError
    run = tmp_path / "nan"
    cfg = _grpo_cfg(run, sft_run, **{"grpo.learning_rate": 1e30, "grpo.warmup_steps": 0,
                                     "grpo.max_bad_steps": 2, "grpo.max_steps": 8,
                                     "grpo.checkpoint_every": 1, "grpo.log_every": 1})
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps had a non-finite loss.*"
                                             r"Last good checkpoint: step \d+ in .*grpo.learning_rate"):
        grpo.train_grpo(cfg, progress=False)
    recs = [r for r in runs.read_metrics(str(run)) if r.get("split") == "train"]
    assert len(recs) < 8 and [r["skipped"] for r in recs[-2:]] == [True, True], recs
    art = runs.load_run(str(run), which="latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(art.params)))
