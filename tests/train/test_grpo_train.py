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

from latentr3_jax.train import grpo, optim
from latentr3_jax.train import state as state_lib
from latentr3_jax.train import step as step_lib
from latentr3_jax.train import fingerprint, runs

from _grpo_helpers import (assert_same_update, fused_and_split, latent_sgd as _latent_sgd,
                           tiny_problem as _tiny_problem)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    s = grpo.GRPOSettings(group_size=4, estimator="reinforce")
    fused_state, fm, _, rm, split_state, sm = fused_and_split(cfg, params, batch, s)
    for k in ("reward_mean", "reward_eps0", "adv_std"):
        np.testing.assert_allclose(fm[k], rm[k], rtol=1e-5)
    np.testing.assert_allclose(fm["loss"], sm["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fm["grad_norm"], sm["grad_norm"], rtol=1e-4)
    assert_same_update(fused_state.params, split_state.params, params)


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
    from latentr3_jax.train import runs
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


def _valid_rewards(run_dir) -> list:
    """[(step, noise-free valid reward)] as the run logged them."""
    return [(r["step"], r["reward"]) for r in runs.read_metrics(str(run_dir))
            if r.get("split") == "valid"]


def test_select_best_keeps_the_highest_valid_reward(sft_run, tmp_path):
    """grpo.select=best: the run's model is the checkpoint with the highest noise-free
    valid reward over the start and every `eval_every` batches."""
    cfg = _grpo_cfg(tmp_path / "best", sft_run)
    cfg.data.max_eval_rows = 8
    cfg.grpo.eval_every = 1
    out = grpo.train_grpo(cfg, progress=False)
    valid = _valid_rewards(tmp_path / "best")
    by_step = dict(valid)
    assert valid[0][0] == 0 and set(range(5)) == set(by_step), valid
    want = max(sorted(by_step), key=lambda s: (by_step[s], -s))   # first of the highest
    assert out["best_step"] == want and out["best_valid_reward"] == by_step[want]
    best = runs.load_run(str(tmp_path / "best"))
    assert best.which == "best" and best.step == want


def test_select_best_returns_the_sft_latent_when_every_step_is_worse(sft_run, tmp_path,
                                                                       monkeypatch):
    """A valid reward that only falls once training moves (minus the squared distance of
    LatentRATT's weights from the SFT run's): the start is the best, and the run's model
    is the SFT weights exactly, while its latest checkpoint has moved."""
    from latentr3_jax.train.grpo import train as grpo_train
    sft = runs.load_run(str(sft_run), which="latest").params
    start = jax.tree.map(jnp.asarray, sft["latent"])

    def distance_reward(model_config, settings):
        def fn(params, batch):
            d = sum(jnp.sum((a.astype(jnp.float32) - b) ** 2) for a, b in
                    zip(jax.tree.leaves(params["latent"]), jax.tree.leaves(start)))
            v = batch["valid"].astype(jnp.float32)
            return -d * v.sum(), v.sum()
        return fn

    monkeypatch.setattr(grpo_train, "reward_fn", distance_reward)
    cfg = _grpo_cfg(tmp_path / "best0", sft_run)
    cfg.data.max_eval_rows = 8
    cfg.grpo.eval_every = 2
    out = grpo.train_grpo(cfg, progress=False)
    valid = _valid_rewards(tmp_path / "best0")
    assert [s for s, _ in valid] == [0, 2, 4] and valid[0][1] == 0.0
    assert all(r < 0 for _, r in valid[1:]), valid
    assert out["best_step"] == 0 and out["best_valid_reward"] == 0.0
    best = runs.load_run(str(tmp_path / "best0"))
    assert best.which == "best" and best.step == 0
    for x, y in zip(jax.tree.leaves(best.params), jax.tree.leaves(sft)):
        np.testing.assert_array_equal(x, y)
    last = runs.load_run(str(tmp_path / "best0"), which="latest").params
    assert not np.array_equal(last["latent"]["q"]["kernel"], sft["latent"]["q"]["kernel"])


def test_select_last_keeps_the_final_step(sft_run, tmp_path):
    cfg = _grpo_cfg(tmp_path / "last", sft_run,
                    **{"grpo.select": "last"})
    cfg.data.max_eval_rows = 8
    out = grpo.train_grpo(cfg, progress=False)
    assert out["best_step"] is None
    run = runs.load_run(str(tmp_path / "last"))
    assert run.step == 4
    last = runs.load_run(str(tmp_path / "last"), which="latest").params
    for x, y in zip(jax.tree.leaves(run.params), jax.tree.leaves(last)):
        np.testing.assert_array_equal(x, y)


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
    from latentr3_jax.train import runs
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


# --------------------------------------------------------------------------- options and diagnostics


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _cos(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_second_iteration_moves_the_ratio_and_clips():
    """mu = 2 with a large step: the first update sees ratio 1 (up to rounding) and clips
    nothing; the second sees the moved policy, its ratio departs from 1 and the clip acts."""
    cfg, params, batch = _tiny_problem()
    s = grpo.GRPOSettings(group_size=4, sigma=1.5, iterations=2)
    tx = _latent_sgd(params, 10.0)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    step_in, _ = jax.jit(lambda p, b, r: grpo.make_rollout_fn(cfg, s)(p, {}, b, r))(
        params, batch, jax.random.PRNGKey(3))
    update = jax.jit(step_lib.make_step_fn(grpo.make_grpo_loss(cfg, s), tx))
    recs = []
    for _ in range(s.iterations):
        state, m = update(state, {**batch, **step_in})
        recs.append(grpo.step.record(jax.device_get(m)))
    assert recs[0]["clip_frac"] == 0.0 and recs[0]["ratio_dev"] < 1e-4, recs[0]
    assert recs[1]["clip_frac"] > 0.1 and recs[1]["ratio_dev"] > 0.05, recs[1]


def test_pathwise_probe_cosine_matches_a_direct_computation():
    """The probe's cosine is cos(estimator gradient, pathwise gradient of the mean noisy
    reward), computed here again from jax.grad; the probe changes no parameter; steps the
    predicate leaves out skip it."""
    cfg, params, batch = _tiny_problem()
    s = grpo.GRPOSettings(group_size=4, sigma=1.5, advantage="rloo", estimator="reinforce")
    tx = _latent_sgd(params, 1e-2)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    loss, probe = grpo.make_fused_loss(cfg, s), grpo.make_pathwise_probe(cfg, s)
    with_probe = jax.jit(step_lib.make_step_fn(loss, tx, probe=probe))
    new_p, m = with_probe(state, batch)
    new_0, m0 = jax.jit(step_lib.make_step_fn(loss, tx))(state, batch)

    rng = jax.random.fold_in(state.rng, state.step)
    count = float(loss(params, batch, rng)[1])
    g_est = jax.grad(lambda p: loss(p, batch, rng)[0] / count)(params)
    g_path = jax.grad(lambda p: probe(p, batch, rng)[0])(params)
    expect = _cos(g_est, g_path)
    assert bool(m["probe_on"])
    np.testing.assert_allclose(float(m["probe_grad_cos"]), expect, rtol=1e-3, atol=1e-5)
    # SGD: the update is -lr * gradient, so its cosine with the reward's ascent is the same
    np.testing.assert_allclose(float(m["probe_update_cos"]), expect, rtol=1e-3, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new_p.params), jax.tree.leaves(new_0.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert "probe_on" not in m0

    skip = jax.jit(step_lib.make_step_fn(loss, tx, probe=probe, probe_when=lambda st: st % 2 == 1))
    _, m1 = skip(state, batch)
    assert not bool(m1["probe_on"]) and float(m1["probe_grad_cos"]) == 0.0


@pytest.mark.parametrize("estimator", ["ppo", "reinforce"])
def test_fused_matches_split_with_trust_region_and_decaying_noise(estimator):
    """latent_trust and a per-prompt sigma give the same loss and gradient through the
    fused step (starting weights as the step's extra argument) as through rollout + update
    (r_sft stored by the rollout); the trust term is latent_trust * sum_units ||r - r_sft||^2."""
    cfg, params, batch = _tiny_problem()
    start = {"latent": jax.tree.map(lambda x: 0.8 * x, params["latent"])}
    batch = {**batch, "sigma": jnp.full((batch["target_ids"].shape[0],), 1.2)}
    s = grpo.GRPOSettings(group_size=4, estimator=estimator, latent_trust=0.5, sigma_final=0.3)
    tx = _latent_sgd(params, 1e-2)
    state = state_lib.new_state(params, tx, jax.random.PRNGKey(1))
    fused_state, fm = jax.jit(step_lib.make_step_fn(grpo.make_fused_loss(cfg, s), tx))(
        state, batch, start)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), grpo.ROLLOUT_SALT)
    step_in, rm = jax.jit(lambda p, b: grpo.make_rollout_fn(cfg, s)(p, start, b, key))(
        state.params, batch)
    split_state, sm = jax.jit(step_lib.make_step_fn(grpo.make_grpo_loss(cfg, s), tx))(
        state, {**batch, **step_in})
    for k in ("reward_mean", "sigma", "latent_drift", "weight_drift"):
        np.testing.assert_allclose(fm[k], rm[k], rtol=1e-5)
    np.testing.assert_allclose(fm["sigma"], 1.2, rtol=1e-6)
    np.testing.assert_allclose(fm["loss"], sm["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fm["trust_sum"], sm["trust_sum"], rtol=1e-5)
    np.testing.assert_allclose(fm["grad_norm"], sm["grad_norm"], rtol=1e-4)

    kw = dict(num_thoughts=1, latent_mode="ratt", dtype=jnp.float32, suffix_len=0)
    r = grpo.rollout.prompt_latents(cfg, params, batch["prompt_ids"], batch["prompt_mask"], **kw)[0][:, -1]
    r0 = grpo.rollout.prompt_latents(cfg, {**params, **start}, batch["prompt_ids"],
                                     batch["prompt_mask"], **kw)[0][:, -1]
    units = np.asarray(grpo.loss.objective_units(s, batch["target_mask"], batch["valid"]))
    expect = float(np.sum(units * np.sum((np.asarray(r) - np.asarray(r0)) ** 2, -1)))
    np.testing.assert_allclose(fm["trust_sum"], expect, rtol=1e-4)
    assert expect > 0
    for a, b, p in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(split_state.params),
                       jax.tree.leaves(params)):
        da, db = np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)
        # the two graphs round differently: a few units in the last place of the weights
        ulp = float(np.spacing(np.float32(np.abs(np.asarray(p)).max())))
        np.testing.assert_allclose(da, db, rtol=1e-4,
                                   atol=max(2e-5 * np.abs(db).max(), 4 * ulp, 1e-12))


@pytest.mark.parametrize("iterations", [1, 2])
def test_grpo_step_schedule_drift_and_probe(iterations):
    """Through GRPOStep: sigma follows its schedule by batch, the drift diagnostics start at
    0 and grow, the probe runs on every second batch (its first update), one compile."""
    import ml_collections
    from latentr3_jax.parallel import mesh as mesh_lib
    from latentr3_jax.train import setup
    cfg, params, batch = _tiny_problem()
    batch = {k: np.asarray(v) for k, v in batch.items()}
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                              devices=jax.devices()[:1])
    s = grpo.GRPOSettings(group_size=4, sigma=1.5, sigma_final=0.5, iterations=iterations,
                          diagnose_every=2)
    tx = _latent_sgd(params, 1e-1)
    state, sh = state_lib.create_sharded_state(None, setup.params_axes(cfg, params), tx,
                                               jax.random.PRNGKey(5), mesh, params=params)
    step = grpo.GRPOStep(cfg, s, tx, mesh, sh, total_batches=3, ref_keys=("latent",))
    ref = {"latent": params["latent"]}
    recs = []
    for _ in range(3):
        state, m = step(state, ref, batch)
        recs.append(grpo.step.record(jax.device_get(m)))
    np.testing.assert_allclose([r["sigma"] for r in recs], [1.5, 1.0, 0.5], rtol=1e-6)
    assert recs[0]["latent_drift"] == 0.0 and recs[0]["weight_drift"] == 0.0
    assert recs[2]["latent_drift"] > 0.0 and recs[2]["weight_drift"] > 0.0
    assert ["pathwise_cos" in r for r in recs] == [False, True, False]
    assert -1.0 <= recs[1]["pathwise_cos"] <= 1.0
    for r in recs:
        for k in ("reward_noisy", "reward_spread", "adv_pos_frac", "latent_norm", "sigma_rel",
                  "noise_rel", "ratio_dev"):
            assert np.isfinite(r[k]), k
    assert step.train_step.compile_count == 1


def test_grpo_run_logs_diagnostics(sft_run, tmp_path):
    """`train_grpo` with the new options end to end: every train record carries the
    diagnostics (metrics.jsonl, hence TensorBoard), the cosine on every second batch."""
    from latentr3_jax.train import runs
    run = tmp_path / "diag"
    cfg = _grpo_cfg(run, sft_run, **{"grpo.diagnose_every": 2, "grpo.sigma_final": 0.5,
                                     "grpo.sigma_schedule": "cosine", "grpo.latent_trust": 0.1,
                                     "grpo.advantage": "rloo", "grpo.estimator": "reinforce"})
    out = grpo.train_grpo(cfg, progress=False)
    assert out["finished"] and out["compile_count"] == 1
    recs = [r for r in runs.read_metrics(str(run)) if r.get("split") == "train"]
    assert [r["batch"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        for k in ("reward_eps0", "reward_noisy", "reward_spread", "adv_pos_frac", "latent_norm",
                  "sigma", "sigma_rel", "noise_rel", "latent_drift", "weight_drift", "trust"):
            assert np.isfinite(r[k]), (k, r)
    assert ["pathwise_cos" in r for r in recs] == [False, True, False, True]
    np.testing.assert_allclose([recs[0]["sigma"], recs[-1]["sigma"]], [1.5, 0.5], rtol=1e-6)
    assert recs[0]["latent_drift"] == 0.0 and recs[-1]["latent_drift"] > 0.0
