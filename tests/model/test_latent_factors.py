"""Factorised latents (model.latent_factors = K > 1): K LatentRATT heads, K thought slots.

Every path that runs the slots with a prefix cache (the SFT forward, LR-GRPO's shared
prompt rollouts, beam search and its latent ensembles) is checked against full passes
over [prompt, K thought slots, target] written out head by head (the release's way with K
slots); the diversity regulariser against hand-made vectors.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax.config import default_config_file, parse_config, validate
from latentr3_jax.decode.beam import constrained_beam_search
from latentr3_jax.decode.trie import ItemTrie
from latentr3_jax.errors import InputError
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import tiny_config
from latentr3_jax.train.grpo import rollout

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/
REPO = os.path.dirname(HERE)
K = 3


def _model(K=K, seed=0, std=0.25):
    config = tiny_config(vocab_size=61, hidden_size=32, intermediate_size=64, num_heads=4,
                         num_kv_heads=2, eos_token_id=2)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = dict(decoder.init_params(config, k1, std=std))
    params["latent"] = latent.init_latent_params(config, k2, std=std, factors=K)
    return config, params


def _batch(seed=0, B=3, P=9, T=5, vocab=61):
    r = np.random.default_rng(seed)
    p_len, t_len = np.array([P, 4, 2])[:B], np.array([T, 3, 1])[:B]
    pm = (np.arange(P)[None] >= (P - p_len)[:, None]).astype(np.int32)
    tm = (np.arange(T)[None] < t_len[:, None]).astype(np.int32)
    pi = np.where(pm, r.integers(3, vocab - 1, (B, P)), 0).astype(np.int32)
    ti = np.where(tm, r.integers(3, vocab - 1, (B, T)), 0).astype(np.int32)
    return [jnp.asarray(x) for x in (pi, pm, ti, tm)]


def test_shapes_and_factor_count():
    config, params = _model()
    d = config.hidden_size
    assert params["latent"]["q"]["kernel"].shape == (K, d, d)
    assert params["latent"]["v"]["bias"].shape == (K, d)
    assert latent.num_factors(params) == K and latent.latent_width(config, params) == K * d
    assert latent.latent_param_shapes(config, K)["k"]["kernel"] == (K, d, d)
    assert latent.latent_param_axes(K)["q"]["kernel"] == (None, "embed", "latent")
    one = dict(params, latent=latent.init_latent_params(config, jax.random.PRNGKey(0)))
    assert latent.num_factors(one) == 1 and latent.num_factors({}) == 1
    # the heads are drawn independently
    q = np.asarray(params["latent"]["q"]["kernel"])
    assert not np.allclose(q[0], q[1])


def test_each_head_is_one_latentratt_over_the_prompt():
    config, params = _model()
    p_ids, p_mask, _, _ = _batch()
    lat, cache, _ = latent.prefill_and_latents(config, params, p_ids, p_mask, num_thoughts=1)
    assert lat.shape == (3, 1, K * config.hidden_size)
    _, hidden, _ = decoder.apply(config, params, p_ids, attention_mask=p_mask)
    for k in range(K):
        head = jax.tree.map(lambda w: w[k], params["latent"])
        want = latent.latent_ratt(config, head, hidden, p_mask.astype(bool),
                                  latent.prompt_positions(p_mask))
        np.testing.assert_allclose(latent.factor_slots(config, lat[:, 0])[:, k], want,
                                   rtol=1e-5, atol=1e-6)
    # room for the prompt and the first K - 1 factor slots (the suffix brings the last)
    assert cache["k"].shape[2] == p_ids.shape[1] + K - 1


def _ce(forward, config, **kw):
    def f(params, p_ids, p_mask, t_ids, t_mask):
        out = forward(config, params, p_ids, p_mask, t_ids, t_mask, **kw)
        logits = out[0] if isinstance(out, tuple) else out
        s, n = latent.target_cross_entropy(logits, t_ids, t_mask)
        return s / n
    return jax.jit(jax.value_and_grad(f))


@pytest.mark.parametrize("with_noise", [False, True])
def test_prefix_cached_forward_matches_full_passes(with_noise):
    config, params = _model()
    batch = _batch()
    noise = (1.5 * jax.random.normal(jax.random.PRNGKey(5), (3, K * config.hidden_size))
             if with_noise else None)
    loss_c, grad_c = _ce(latent.latent_forward, config, latent_noise=noise)(params, *batch)
    loss_r, grad_r = _ce(latent.reference_forward, config, thought_id=config.vocab_size - 1,
                         latent_noise=noise)(params, *batch)
    np.testing.assert_allclose(loss_c, loss_r, rtol=1e-5, atol=1e-6)
    ref = dict(jax.tree_util.tree_leaves_with_path(grad_r))
    for path, g in jax.tree_util.tree_leaves_with_path(grad_c):
        scale = float(jnp.max(jnp.abs(ref[path]))) + 1e-8
        np.testing.assert_allclose(g, ref[path], rtol=2e-4, atol=2e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    g = np.asarray(grad_c["latent"]["v"]["kernel"])
    assert all(np.abs(g[k]).max() > 0 for k in range(K)), "every head must receive gradient"


def test_factors_need_one_thought_in_ratt_mode():
    config, params = _model()
    p_ids, p_mask, t_ids, t_mask = _batch()
    with pytest.raises(ValueError, match="num_thoughts = 1"):
        latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask, num_thoughts=2)
    cfg, _ = parse_config(["--config", default_config_file("demo.py"),
                           "--config.model.latent_factors=2", "--config.model.num_thoughts=2"])
    with pytest.raises(InputError, match="latent_factors=2 needs model.num_thoughts <= 1"):
        validate(cfg)
    cfg, _ = parse_config(["--config", default_config_file("demo.py"),
                           "--config.model.latent_factors=2", "--config.model.latent_mode=hidden"])
    with pytest.raises(InputError, match="latent_mode=ratt"):
        validate(cfg)


def test_factor_diversity_on_hand_made_vectors():
    config = tiny_config(hidden_size=4, num_heads=2, num_kv_heads=1)
    e = np.eye(4, dtype=np.float32)
    orth = np.concatenate([e[0], 3 * e[1], e[2]])             # K = 3, orthogonal
    par = np.concatenate([e[0], -2 * e[0], 5 * e[0]])         # parallel (cos = +-1)
    # K = 2: cos 0.5 between the two factors -> mean squared cosine 0.25
    half = np.concatenate([np.array([1, 0, 0, 0], np.float32),
                           np.array([0.5, np.sqrt(0.75), 0, 0], np.float32)])
    div = lambda x, v=None: float(latent.factor_diversity(config, jnp.asarray(x)[:, None], v))
    assert div(orth[None]) == pytest.approx(0.0, abs=1e-7)
    assert div(par[None]) == pytest.approx(1.0, rel=1e-6)
    assert div(half[None]) == pytest.approx(0.25, rel=1e-6)
    both = np.stack([orth, par])
    assert div(both) == pytest.approx(0.5, rel=1e-6)
    assert div(both, jnp.array([True, False])) == pytest.approx(0.0, abs=1e-7)   # fillers ignored
    assert div(e[:1]) == 0.0                                                       # K = 1


def test_sft_loss_adds_the_weighted_diversity_and_reports_it():
    from latentr3_jax.train import sft
    config, params = _model()
    p_ids, p_mask, t_ids, t_mask = _batch()
    b = {"prompt_ids": p_ids, "prompt_mask": p_mask, "target_ids": t_ids, "target_mask": t_mask,
         "valid": jnp.array([True, True, False])}
    plain = sft.make_sft_loss(config, num_thoughts=1)(params, b, None)
    reg = sft.make_sft_loss(config, num_thoughts=1, diversity=0.7)(params, b, None)
    lat = latent.latent_forward(config, params, p_ids, p_mask, t_ids, t_mask)[1]
    cos2 = float(latent.factor_diversity(config, lat, b["valid"]))
    assert cos2 > 0
    assert float(reg[1]) == float(plain[1])                     # same token count
    np.testing.assert_allclose(float(reg[0]), float(plain[0]) + 0.7 * cos2 * float(plain[1]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(plain[2]["diversity_sum"]), cos2 * float(plain[1]), rtol=1e-5)


def test_grpo_shared_prefix_rollout_matches_full_sequences():
    """G noisy copies of all K factors per prompt from one prompt pass = G full passes."""
    config, params = _model()
    batch = _batch(B=2)
    G = 3
    noise = rollout.sample_noise(jax.random.PRNGKey(2), 2, G, latent.latent_width(config, params),
                                 1.5)
    assert noise.shape == (2, G, K * config.hidden_size)

    def shared(p):
        return rollout.group_logprobs(config, p, *batch, noise, num_thoughts=1)[0]

    def full(p):
        p = {k: (v if k == "latent" else jax.lax.stop_gradient(v)) for k, v in p.items()}
        rows = [latent.target_logprobs(latent.reference_forward(
            config, p, *batch, thought_id=config.vocab_size - 1, latent_noise=noise[:, g]),
            batch[2]) for g in range(G)]
        return jnp.stack(rows, 1).reshape(-1, batch[2].shape[1])

    tm = jnp.repeat(batch[3], G, axis=0)
    obj = lambda f: jax.jit(jax.value_and_grad(lambda p: jnp.sum(f(p) * tm)))
    (a, ga), (b_, gb) = obj(shared)(params), obj(full)(params)
    np.testing.assert_allclose(a, b_, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        scale = float(jnp.max(jnp.abs(y))) + 1e-12
        np.testing.assert_allclose(x / scale, y / scale, atol=2e-5)
    assert float(jnp.max(jnp.abs(ga["layers"]["mlp"]["up"]["kernel"]))) == 0.0   # LLM frozen


def _catalog(seed=0):
    rng = np.random.default_rng(seed)
    cat, i = {}, 0
    for _ in range(6):
        head = [int(rng.integers(3, 40))]
        for _ in range(int(rng.integers(1, 4))):
            cat[i] = head + [int(t) for t in rng.integers(3, 40, size=rng.integers(0, 3))] + [2]
            i += 1
    return cat


@pytest.mark.parametrize("samples", [1, 3])
def test_wide_beam_equals_brute_force_with_factors(samples):
    """With beams >= titles the search is exhaustive; each title's score must equal its
    full-pass log-prob with the K factor slots (and, for an ensemble, the log-mean-exp over
    the noisy latents of the same full passes)."""
    config, params = _model(std=0.35)
    trie = ItemTrie(_catalog(), config.vocab_size, width=3)
    p_ids, p_mask, _, _ = _batch()
    B, L, T = trie.num_leaves + 2, trie.num_leaves, trie.max_len
    sigma = 0.8
    res = constrained_beam_search(config, params, trie.arrays(), p_ids, p_mask, max_len=T,
                                  num_beams=B, length_penalty=0.0, num_thoughts=1,
                                  latent_samples=samples, latent_sigma=sigma)
    tgt = np.zeros((L, T), np.int32)
    tmask = np.zeros((L, T), np.int32)
    for j, seq in enumerate(trie.leaf_tokens):
        tgt[j, :len(seq)], tmask[j, :len(seq)] = seq, 1
    U = p_ids.shape[0]
    from latentr3_jax.decode.beam import latent_sample_noise
    noise = latent_sample_noise(latent.latent_width(config, params), samples, sigma)
    per_sample = []
    for m in range(samples):
        logits = latent.reference_forward(
            config, params, jnp.repeat(p_ids, L, 0), jnp.repeat(p_mask, L, 0),
            jnp.asarray(np.tile(tgt, (U, 1))), jnp.asarray(np.tile(tmask, (U, 1))),
            thought_id=config.vocab_size - 1,
            latent_noise=jnp.tile(noise[m][None], (U * L, 1)))
        lp = latent.target_logprobs(logits, jnp.asarray(np.tile(tgt, (U, 1)))) * np.tile(tmask, (U, 1))
        per_sample.append(np.asarray(lp.sum(-1)).reshape(U, L))
    bf = np.asarray(jax.scipy.special.logsumexp(jnp.stack(per_sample), axis=0)) - np.log(samples)
    leaf, scores, valid = map(np.asarray, (res.leaf, res.scores, res.valid))
    for u in range(U):
        got = leaf[u][valid[u]]
        assert sorted(got) == list(range(L))
        np.testing.assert_allclose(scores[u][valid[u]], bf[u][got], atol=3e-4, rtol=1e-5)


def test_sft_grpo_evaluate_export_end_to_end(tmp_path):
    """A K = 2 run through SFT (diversity logged), LR-GRPO (noise on both factors), the
    evaluation and the HF export, which loads back with the same predictions."""
    from latentr3_jax.eval.evaluate import evaluate_run
    from latentr3_jax.train import runs
    from latentr3_jax.train.grpo import train_grpo
    from latentr3_jax.train.sft import train_sft
    from latentr3_jax.utils.jsonio import read_json

    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    common = ["--config", default_config_file("sft_tiny.py"), "--config.model.latent_factors=2",
              "--config.data.max_train_rows=32", "--config.data.max_eval_rows=6",
              "--config.sft.log_every=1", "--config.eval.num_beams=3",
              "--config.eval.progress=False", "--config.eval.split=valid"]
    cfg, _ = parse_config(common + [f"--config.workdir={sft_dir}", "--config.sft.latent_diversity=0.5"])
    summary = train_sft(cfg, progress=False)
    assert summary["latent_factors"] == 2
    recs = [r for r in runs.read_metrics(str(sft_dir)) if r.get("split") == "train"]
    assert recs and all(0.0 <= r["factor_cos2"] <= 1.0 for r in recs)
    assert read_json(str(sft_dir / runs.MODEL_CONFIG))["latent_factors"] == 2
    run = runs.load_run(str(sft_dir))
    assert latent.num_factors(run.params) == 2

    gcfg, _ = parse_config(common + [f"--config.workdir={grpo_dir}",
                                     f"--config.grpo.init_from={sft_dir}",
                                     "--config.grpo.max_steps=2", "--config.grpo.prompts_per_batch=4",
                                     "--config.grpo.group_size=3", "--config.grpo.log_every=1",
                                     "--config.grpo.evaluate=False",
                                     # the final step's latents: this checks that all K move
                                     "--config.grpo.select=last"])
    train_grpo(gcfg, progress=False)
    grun = runs.load_run(str(grpo_dir))
    moved = [float(jnp.max(jnp.abs(grun.params["latent"]["v"]["kernel"][k]
                                   - run.params["latent"]["v"]["kernel"][k]))) for k in range(2)]
    assert all(m > 0 for m in moved), moved

    m1 = evaluate_run(gcfg, str(grpo_dir), split="valid", out_dir=str(tmp_path / "ev"),
                      print_table=False)
    export = tmp_path / "export"
    runs.export_hf(grun, str(export))
    assert read_json(str(export / runs.EXPORT))["latent_factors"] == 2
    back = runs.load_run(str(export))
    assert latent.num_factors(back.params) == 2
    m2 = evaluate_run(gcfg, str(export), split="valid", out_dir=str(tmp_path / "ev2"),
                      print_table=False)
    p1 = [json.loads(x)["ranked_titles"] for x in open(tmp_path / "ev" / "predictions.jsonl")]
    p2 = [json.loads(x)["ranked_titles"] for x in open(tmp_path / "ev2" / "predictions.jsonl")]
    assert p1 == p2 and m1["NDCG@10"] == m2["NDCG@10"]


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from latentr3_jax.model import latent
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import sft, setup, state as state_lib
    from latentr3_jax.train.step import TrainStep
    from _sft_helpers import make_tx, random_batch, tiny_model

    config = tiny_model(vocab=97, hidden=32)
    def init(rng):
        k1, k2 = jax.random.split(rng)
        p = dict(latent.decoder.init_params(config, k1))
        p["latent"] = latent.init_latent_params(config, k2, factors=3)
        return p
    axes = setup.params_axes(config, jax.eval_shape(init, jax.random.PRNGKey(0)))
    out = {}
    for name, m, devs in [("1", (1, 1, 1), jax.devices()[:1]), ("2x2", (1, 2, 2), None)]:
        mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), m)), devices=devs)
        tx, sched = make_tx(lr=1e-2)
        state, sh = state_lib.create_sharded_state(init, axes, tx, jax.random.PRNGKey(0), mesh)
        loss = sft.make_sft_loss(config, num_thoughts=1, diversity=0.3)
        step = TrainStep(loss, tx, mesh, sh, schedule=sched)
        losses = []
        for i in range(2):
            state, met = step(state, random_batch(i, 97))
            losses.append(float(met["loss"]))
        out[name] = {"losses": losses,
                     "spec": str(state.params["latent"]["q"]["kernel"].sharding.spec)}
    print("RESULT" + json.dumps(out))
""")


def test_factors_train_sharded_like_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED, HERE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    assert res["2x2"]["losses"] == pytest.approx(res["1"]["losses"], rel=2e-5)
    assert res["2x2"]["spec"] == "P(None, 'fsdp', None)"   # factor axis replicated, d on fsdp
