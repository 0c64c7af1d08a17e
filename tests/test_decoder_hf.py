"""The decoder against transformers: logits, KV-cache decoding and greedy generation.

Each tiny random checkpoint is built once per module by transformers and loaded with
`latentr3_jax.hf.load_pretrained`; torch is the independent reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_fixtures import left_padded_batch, load_torch, make_hf_model, torch_logits  # noqa: E402
from latentr3_jax import hf  # noqa: E402
from latentr3_jax.model import apply, init_cache, logits  # noqa: E402

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)

# name -> make_hf_model kwargs: GQA ratios 2, 4 (MQA), 1 (MHA), 4; tied/untied; biases on/off.
VARIANTS = {
    "qwen2_tied_gqa2": dict(arch="qwen2", tied=True, num_attention_heads=4, num_key_value_heads=2),
    "qwen2_untied_mqa": dict(arch="qwen2", tied=False, hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=1, vocab_size=200, rope_theta=1e6),
    "llama_untied_mha_legacy_cfg": dict(arch="llama", tied=False, bias=False, num_attention_heads=4,
                                        num_key_value_heads=4, rope_theta=500.0,
                                        legacy_config=True),
    "llama_tied_bias_llama3": dict(arch="llama", tied=True, bias=True, hidden_size=64,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   intermediate_size=96, rope_theta=5e5, rope_scaling=LLAMA3),
}


class Model:
    def __init__(self, path):
        self.path = path
        self.torch = load_torch(path)
        self.config, self.params = hf.load_pretrained(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tmp_path_factory):
    kw = dict(VARIANTS[request.param])
    path = make_hf_model(tmp_path_factory.mktemp("hf"), name=request.param, **kw)
    return Model(path)


def _real(mask):
    return mask.astype(bool)


def test_logits_match_torch_on_left_padded_batch(model):
    ids, mask = left_padded_batch(model.config.vocab_size, lengths=(11, 4, 8, 1))
    ref = torch_logits(model.torch, ids, mask)
    ours = np.asarray(logits(model.config, model.params, ids, mask))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the model is not trivially flat
    np.testing.assert_allclose(ours[_real(mask)], ref[_real(mask)], atol=1e-4, rtol=1e-4)


@functools.partial(jax.jit, static_argnums=0)
def _step(config, params, ids, mask, cache):
    out, _, cache = apply(config, params, ids, attention_mask=mask, cache=cache)
    return out, cache


def test_prefill_then_stepwise_decode_equals_full_forward(model):
    cfg, params = model.config, model.params
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(12, 6, 9), seed=1)
    full = np.asarray(logits(cfg, params, ids, mask))
    P = 7  # prefill the first 7 columns (row 1 is still all padding there), then 1 at a time
    cache = init_cache(cfg, ids.shape[0], ids.shape[1] + 2)
    out, cache = _step(cfg, params, jnp.asarray(ids[:, :P]), jnp.asarray(mask[:, :P]), cache)
    got = [np.asarray(out)]
    for t in range(P, ids.shape[1]):
        out, cache = _step(cfg, params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        got.append(np.asarray(out))
    got = np.concatenate(got, axis=1)
    real = _real(mask)
    np.testing.assert_allclose(got[real], full[real], atol=2e-5, rtol=1e-5)
    assert int(cache["index"]) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), mask.sum(1))


def _greedy(cfg, params, ids, mask, steps):
    B, P = ids.shape
    cache = init_cache(cfg, B, P + steps)
    out, cache = _step(cfg, params, jnp.asarray(ids), jnp.asarray(mask), cache)
    tok = jnp.argmax(out[:, -1], axis=-1)
    toks = [tok]
    ones = jnp.ones((B, 1), jnp.int32)
    for _ in range(steps - 1):
        out, cache = _step(cfg, params, tok[:, None].astype(jnp.int32), ones, cache)
        tok = jnp.argmax(out[:, -1], axis=-1)
        toks.append(tok)
    return np.stack([np.asarray(t) for t in toks], axis=1)


def test_greedy_continuation_matches_generate(model):
    cfg, params = model.config, model.params
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 3, 5), seed=2)
    steps = 16
    with torch.no_grad():
        ref = model.torch.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                   max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    ref = ref[:, ids.shape[1]:].numpy()
    assert ref.shape == (3, steps)
    ours = _greedy(cfg, params, ids.astype(np.int32), mask.astype(np.int32), steps)
    np.testing.assert_array_equal(ours, ref)


def test_bfloat16_compute_close_to_float32(model):
    cfg, params = model.config, model.params
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(9, 5), seed=3)
    f32 = np.asarray(logits(cfg, params, ids, mask))
    bf16 = logits(cfg, params, ids, mask, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32 and bf16.shape == (2, 9, cfg.vocab_size)
    bf16 = np.asarray(bf16)
    real = _real(mask)
    err = np.abs(bf16 - f32)[real]
    scale = np.abs(f32[real]).max()
    assert err.max() < 0.08 * scale, (err.max(), scale)
    assert err.mean() < 0.02 * scale
    assert not np.array_equal(bf16, f32)  # it really ran in lower precision


# ----------------------------------------------------------------- the parity test has teeth


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    kw = dict(VARIANTS["qwen2_tied_gqa2"])
    return Model(make_hf_model(tmp_path_factory.mktemp("hf_neg"), name="neg", **kw))


def _max_diff(model, cfg, params):
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(11, 4, 8))
    ref = torch_logits(model.torch, ids, mask)
    ours = np.asarray(logits(cfg, params, ids, mask))
    return np.abs(ours - ref)[_real(mask)].max()


def test_parity_baseline_is_tight(qwen):
    assert _max_diff(qwen, qwen.config, qwen.params) < 1e-4


def test_wrong_rope_base_is_caught(qwen):
    assert _max_diff(qwen, qwen.config.replace(rope_theta=1e6), qwen.params) > 1e-3


def test_zeroed_q_bias_is_caught(qwen):
    params = jax.tree.map(lambda x: x, qwen.params)
    params["layers"]["attn"]["q"]["bias"] = np.zeros_like(params["layers"]["attn"]["q"]["bias"])
    assert _max_diff(qwen, qwen.config, params) > 1e-3


def test_missing_bias_config_is_caught(qwen):
    params = jax.tree.map(lambda x: x, qwen.params)
    for name in "qkv":
        del params["layers"]["attn"][name]["bias"]
    assert _max_diff(qwen, qwen.config.replace(attention_bias=False), params) > 1e-3


def test_swapped_heads_are_caught(qwen):
    params = jax.tree.map(lambda x: x, qwen.params)
    k = params["layers"]["attn"]["k"]["kernel"]
    params["layers"]["attn"]["k"]["kernel"] = k[..., ::-1, :]  # kv heads in the wrong order
    assert _max_diff(qwen, qwen.config, params) > 1e-3


def test_attending_to_padding_is_caught(qwen):
    cfg, params = qwen.config, qwen.params
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=(11, 4, 8))
    ref = torch_logits(qwen.torch, ids, mask)
    pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0))
    out, _, _ = apply(cfg, params, jnp.asarray(ids), positions=pos)  # no attention mask
    assert np.abs(np.asarray(out) - ref)[_real(mask)].max() > 1e-3


def test_llama3_scaling_matters(tmp_path_factory):
    kw = dict(VARIANTS["llama_tied_bias_llama3"])
    m = Model(make_hf_model(tmp_path_factory.mktemp("hf_l3"), name="l3", **kw))
    assert _max_diff(m, m.config, m.params) < 1e-4
    assert _max_diff(m, m.config.replace(rope_scaling=None), m.params) > 1e-3
