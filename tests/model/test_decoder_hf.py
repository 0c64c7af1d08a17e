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


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Each variant is built once per module, whichever tests ask for it."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Model(make_hf_model(tmp_path_factory.mktemp("hf"), name=name, **VARIANTS[name]))
        return cache[name]
    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, build):
    return build(request.param)


# One batch shape for every forward pass keeps the number of compilations down:
# prompts [4, PROMPT] left-padded, and prompt + STEPS generated tokens for full forwards.
LENGTHS, STEPS = (12, 6, 9, 3), 16
PROMPT = max(LENGTHS)


def _real(mask):
    return mask.astype(bool)


def _batch(vocab_size, seed=0):
    """Left-padded [4, PROMPT + STEPS] ids and mask."""
    return left_padded_batch(vocab_size, lengths=tuple(n + STEPS for n in LENGTHS), seed=seed)


def test_logits_match_torch_on_left_padded_batch(model):
    ids, mask = _batch(model.config.vocab_size)
    ref = torch_logits(model.torch, ids, mask)
    ours = np.asarray(logits(model.config, model.params, ids, mask))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the model is not trivially flat
    np.testing.assert_allclose(ours[_real(mask)], ref[_real(mask)], atol=1e-4, rtol=1e-4)


@functools.partial(jax.jit, static_argnums=0)
def _step(config, params, ids, mask, cache):
    out, _, cache = apply(config, params, ids, attention_mask=mask, cache=cache)
    return out, cache


def test_greedy_generate_and_cached_decode(model):
    """16 greedy tokens equal transformers' `generate`; the logits of the prefill + one-token
    cached steps equal a full forward over prompt + continuation."""
    cfg, params = model.config, model.params
    ids, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS, seed=2)
    with torch.no_grad():
        ref = model.torch.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                   max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    ref = ref[:, PROMPT:].numpy()
    assert ref.shape == (len(LENGTHS), STEPS)

    B = len(LENGTHS)
    cache = init_cache(cfg, B, PROMPT + STEPS)
    out, cache = _step(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), cache)
    step_logits, toks = [out], []
    ones = jnp.ones((B, 1), jnp.int32)
    for t in range(STEPS):
        tok = jnp.argmax(step_logits[-1][:, -1], axis=-1).astype(jnp.int32)
        toks.append(tok)
        if t < STEPS - 1:
            out, cache = _step(cfg, params, tok[:, None], ones, cache)
            step_logits.append(out)
    ours = np.stack([np.asarray(t) for t in toks], axis=1)
    np.testing.assert_array_equal(ours, ref)

    assert int(cache["index"]) == PROMPT + STEPS - 1
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), np.array(LENGTHS) + STEPS - 1)
    full_ids = np.concatenate([ids, ours], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(ours)], axis=1)
    full = np.asarray(logits(cfg, params, full_ids, full_mask))[:, :-1]
    cached = np.concatenate([np.asarray(x) for x in step_logits], axis=1)
    real = _real(full_mask[:, :-1])
    np.testing.assert_allclose(cached[real], full[real], atol=2e-5, rtol=1e-5)


def test_bfloat16_compute_close_to_float32(model):
    cfg, params = model.config, model.params
    ids, mask = _batch(cfg.vocab_size)
    f32 = np.asarray(logits(cfg, params, ids, mask))
    bf16 = logits(cfg, params, ids, mask, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32 and bf16.shape == ids.shape + (cfg.vocab_size,)
    bf16 = np.asarray(bf16)
    real = _real(mask)
    err = np.abs(bf16 - f32)[real]
    scale = np.abs(f32[real]).max()
    assert err.max() < 0.08 * scale, (err.max(), scale)
    assert err.mean() < 0.02 * scale
    assert not np.array_equal(bf16, f32)  # it really ran in lower precision


# ----------------------------------------------------------------- the parity test has teeth


@pytest.fixture(scope="module")
def qwen(build):
    return build("qwen2_tied_gqa2")


def _max_diff(model, cfg, params):
    ids, mask = _batch(cfg.vocab_size)
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
    ids, mask = _batch(cfg.vocab_size)
    ref = torch_logits(qwen.torch, ids, mask)
    pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0))
    out, _, _ = apply(cfg, params, jnp.asarray(ids), positions=pos)  # no attention mask
    assert np.abs(np.asarray(out) - ref)[_real(mask)].max() > 1e-3


def test_llama3_scaling_matters(build):
    m = build("llama_tied_bias_llama3")
    assert _max_diff(m, m.config, m.params) < 1e-4
    assert _max_diff(m, m.config.replace(rope_scaling=None), m.params) > 1e-3
