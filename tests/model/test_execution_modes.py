"""Execution options change how the decoder runs, never what it computes.

- `mixed.einsum`: float32 is plain `jnp.einsum`; bfloat16 matches a float32 reference on the
  same (bf16-rounded) inputs, forward and gradients, bias included.
- bfloat16 training compiles to native bf16 x bf16 -> f32 dots (no dot on operands upcast
  from bf16), so the fast path cannot silently regress.
- Unrolled layers (scan_layers=False), remat and `jax.nn.dot_product_attention`
  (attention_impl=xla) give the scanned einsum model's logits, cached decode and LatentR³
  loss gradients.
- cfg.model.scan_layers / remat / attention_impl reach the model config, and never its
  saved architecture.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from latentr3_jax.errors import InputError
from latentr3_jax.model import decoder, latent, mixed
from latentr3_jax.model.config import DecoderConfig, tiny_config
from latentr3_jax.train import setup

# every contraction form the decoder, LatentRATT and beam search use
SPECS = [
    ("nk,km->nm", (12, 16), (16, 24)),
    ("nd,vd->nv", (12, 16), (37, 16)),
    ("nd,dv->nv", (12, 16), (16, 37)),
    ("btkgd,bskd->bkgts", (2, 5, 2, 2, 8), (2, 5, 2, 8)),
    ("bkgts,bskd->btkgd", (2, 2, 2, 5, 5), (2, 5, 2, 8)),
    ("bqd,bsd->bqs", (3, 1, 16), (3, 7, 16)),
    ("bqs,bsd->bqd", (3, 1, 7), (3, 7, 16)),
    ("bnkgd,bskd->bkgns", (2, 3, 2, 2, 8), (2, 7, 2, 8)),
    ("bnkgd,bntkd->bkgnt", (2, 3, 2, 2, 8), (2, 3, 4, 2, 8)),
    ("bkgns,bskd->bnkgd", (2, 2, 2, 3, 7), (2, 7, 2, 8)),
    ("bkgnt,bntkd->bnkgd", (2, 2, 2, 3, 4), (2, 3, 4, 2, 8)),
]


def _rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_mixed_einsum_float32_is_einsum(spec, sa, sb):
    a, b = _rand(sa, 0), _rand(sb, 1)
    np.testing.assert_array_equal(mixed.einsum(spec, a, b), jnp.einsum(spec, a, b))


@pytest.mark.parametrize("spec,sa,sb", SPECS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_mixed_einsum_bf16_matches_f32_reference(spec, sa, sb, with_bias):
    a, b = _rand(sa, 0, jnp.bfloat16), _rand(sb, 1, jnp.bfloat16)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, a, b)).shape
    bias = _rand(out_shape[-1:], 2) if with_bias else None
    w = _rand(out_shape, 3)  # a non-trivial cotangent

    def loss(fn, a, b, bias):
        y = fn(a, b, bias)
        return jnp.sum(y.astype(jnp.float32) * w)

    ours = lambda a, b, bias: mixed.einsum(spec, a, b, jnp.float32, bias=bias)
    ref = lambda a, b, bias: jnp.einsum(spec, a, b) + (0 if bias is None else bias)
    argn = (0, 1, 2) if with_bias else (0, 1)
    v, g = jax.jit(jax.value_and_grad(lambda *x: loss(ours, *x), argnums=argn))(a, b, bias)
    rv, rg = jax.value_and_grad(lambda *x: loss(ref, *x), argnums=argn)(
        a.astype(jnp.float32), b.astype(jnp.float32), bias)
    np.testing.assert_allclose(v, rv, rtol=1e-5, atol=1e-3)
    for got, want, name in zip(g, rg, ("a", "b", "bias")):
        assert got.dtype == (jnp.float32 if name == "bias" else jnp.bfloat16)
        scale = float(jnp.abs(want).max())
        # the gradient is rounded once to bf16 (8 bits): within 2^-8 of its scale
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=scale / 2 ** 7,
                                   err_msg=f"{spec} d{name}")
    # default output dtype is the operands' dtype
    assert mixed.einsum(spec, a, b).dtype == jnp.bfloat16


def test_mixed_einsum_rejects_one_sided_sums():
    with pytest.raises(ValueError, match="one operand only"):
        mixed.einsum("nk,km->n", _rand((2, 3), 0, jnp.bfloat16), _rand((3, 4), 1, jnp.bfloat16))


def _config(**kw):
    return tiny_config(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                       num_kv_heads=2, num_layers=3, **kw)


def _params(config):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = dict(decoder.init_params(config, k1, std=0.2))
    params["latent"] = latent.init_latent_params(config, k2, std=0.2)
    return params


def _batch(vocab, B=3, P=9, T=6):
    r = np.random.default_rng(0)
    p_len, t_len = np.array([P, P - 3, 2])[:B], np.array([T, 3, 1])[:B]
    p_mask = (np.arange(P)[None] >= (P - p_len)[:, None]).astype(np.int32)
    t_mask = (np.arange(T)[None] < t_len[:, None]).astype(np.int32)
    p_ids = np.where(p_mask, r.integers(1, vocab - 1, (B, P)), 0).astype(np.int32)
    t_ids = np.where(t_mask, r.integers(1, vocab - 1, (B, T)), 0).astype(np.int32)
    return [jnp.asarray(x) for x in (p_ids, p_mask, t_ids, t_mask)]


def _sft_grad(config, params, batch, dtype=jnp.float32, num_thoughts=2):
    def f(params):
        logits, _ = latent.latent_forward(config, params, *batch, num_thoughts=num_thoughts,
                                          latent_mode="ratt", dtype=dtype)
        s, n = latent.target_cross_entropy(logits, batch[2], batch[3])
        return s / n
    return jax.jit(jax.value_and_grad(f))


def _assert_trees_close(a, b, rtol, atol_frac):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        scale = float(jnp.abs(y).max()) + 1e-12
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_frac * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat=True),
                                     dict(scan_layers=False, remat=True),
                                     dict(attention_impl="xla"),
                                     dict(attention_impl="xla", scan_layers=False)])
def test_unrolled_and_remat_match_scanned(variant):
    base = _config()
    other = base.with_execution(**variant)
    assert other != base and other.to_dict() == base.to_dict()
    params, batch = _params(base), _batch(base.vocab_size)
    ids = jnp.concatenate([batch[0], batch[2]], 1)
    mask = jnp.concatenate([batch[1], batch[3]], 1)
    l_ref = decoder.apply(base, params, ids, attention_mask=mask)[0]
    l_new = decoder.apply(other, params, ids, attention_mask=mask)[0]
    np.testing.assert_allclose(l_new, l_ref, rtol=1e-5, atol=1e-5)
    # prefill + one cached step
    def cached_step(cfg_):
        cache = decoder.init_cache(cfg_, 3, 16)
        _, _, cache = decoder.apply(cfg_, params, batch[0], attention_mask=batch[1], cache=cache)
        step, _, cache = decoder.apply(cfg_, params, batch[2][:, :1], cache=cache)
        return step, cache["k"], cache["v"]
    for x, y in zip(cached_step(other), cached_step(base)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    loss_r, grad_r = _sft_grad(base, params, batch)(params)
    loss_n, grad_n = _sft_grad(other, params, batch)(params)
    np.testing.assert_allclose(loss_n, loss_r, rtol=1e-6)
    _assert_trees_close(grad_n, grad_r, rtol=1e-4, atol_frac=1e-5)


@pytest.mark.parametrize("scan_layers,attention_impl", [(True, "einsum"), (False, "einsum"),
                                                        (False, "xla")])
def test_bf16_training_matches_f32(scan_layers, attention_impl):
    """bf16 compute (float32 params) gives the float32 loss and gradient direction."""
    config = _config(scan_layers=scan_layers, attention_impl=attention_impl)
    params, batch = _params(config), _batch(config.vocab_size)
    l32, g32 = _sft_grad(config, params, batch)(params)
    l16, g16 = _sft_grad(config, params, batch, jnp.bfloat16)(params)
    np.testing.assert_allclose(l16, l32, rtol=3e-2)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree_util.tree_leaves(g32)):
        assert a.dtype == jnp.float32, jax.tree_util.keystr(path)
        a, b = np.ravel(a), np.ravel(b)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        assert cos > 0.98, (jax.tree_util.keystr(path), cos)


def _dot_operand_types(hlo: str):
    """(lhs, rhs, batched) for every dot in optimized HLO text (names are local to each
    computation, so types are looked up per computation)."""
    dots = []
    for comp in re.split(r"\n(?=\S)", hlo):  # a computation starts at column 0
        types = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", comp)}
        for line in comp.splitlines():
            m = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
            if m:
                dots.append((types.get(m.group(1)), types.get(m.group(2)), "lhs_batch_dims" in line))
    return dots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU compiler's output")
def test_bf16_step_compiles_to_native_bf16_dots():
    """Every token matmul of the bf16 SFT gradient (projections, lm head, and both of their
    gradients) is a bf16 x bf16 dot: XLA CPU runs those natively, while it upcasts a bf16
    -> bf16 dot, or a bf16 weight-gradient dot in the plain form, to float32 (slower than
    float32 compute). Guards `mixed` against silent regressions. (Attention's small batched
    dots are left to the compiler.) Sizes are realistic: XLA treats tiny dots differently."""
    config = tiny_config(vocab_size=300, hidden_size=128, intermediate_size=256, num_heads=4,
                         num_kv_heads=2, num_layers=2, scan_layers=False)
    params = _params(config)
    r = np.random.default_rng(0)
    batch = [jnp.asarray(r.integers(1, 299, (4, 32)), jnp.int32), jnp.ones((4, 32), jnp.int32),
             jnp.asarray(r.integers(1, 299, (4, 8)), jnp.int32), jnp.ones((4, 8), jnp.int32)]
    hlo = _sft_grad(config, params, batch, jnp.bfloat16).lower(params).compile().as_text()
    matmuls = [d for d in _dot_operand_types(hlo) if not d[2]]
    # 2 layers x 7 projections x (forward, input grad, weight grad) + lm head x 3, at least
    assert len(matmuls) >= 2 * 7 * 3 + 3, f"found only {len(matmuls)} token matmuls"
    slow = [d for d in matmuls if d[:2] != ("bf16", "bf16")]
    assert not slow, f"{len(slow)} of {len(matmuls)} token matmuls run on non-bf16 operands"
    # and float32 compute stays float32
    hlo32 = _sft_grad(config, params, batch).lower(params).compile().as_text()
    assert all(d[:2] == ("f32", "f32") for d in _dot_operand_types(hlo32))


def test_execution_options_from_run_config():
    cfg = ml_collections.ConfigDict({"model": {"scan_layers": "auto", "remat": True}})
    shallow, deep = _config(), _config().replace(num_layers=12)
    assert setup.execution_config(cfg, shallow).scan_layers is False
    assert setup.execution_config(cfg, deep).scan_layers is (jax.default_backend() != "cpu")
    assert setup.execution_config(cfg, shallow).remat is True
    # auto unrolls a deep model on a CPU only
    for backend, want in (("cpu", False), ("tpu", True), ("gpu", True)):
        assert setup.scan_layers_option("auto", 30, backend=backend) is want
        assert setup.scan_layers_option("auto", 4, backend=backend) is False
        assert setup.scan_layers_option("true", 30, backend=backend) is True
    cfg16 = ml_collections.ConfigDict({"model": {"scan_layers": "auto", "remat": False,
                                                 "dtype": "bfloat16"}})
    assert setup.execution_config(cfg16, deep).scan_layers is (jax.default_backend() != "cpu")
    for value, want in (("true", True), ("False", False), (True, True), (False, False)):
        c = ml_collections.ConfigDict({"model": {"scan_layers": value, "remat": False}})
        assert setup.execution_config(c, shallow).scan_layers is want
    cfg.model.scan_layers = "sometimes"
    with pytest.raises(InputError, match="model.scan_layers"):
        setup.execution_config(cfg, shallow)
    cfg.model.scan_layers = "auto"
    assert setup.execution_config(cfg, shallow).attention_impl == "einsum"   # key absent
    cfg.model.attention_impl = "xla"
    assert setup.execution_config(cfg, shallow).attention_impl == "xla"
    cfg.model.attention_impl = "flash"
    with pytest.raises(InputError, match="model.attention_impl"):
        setup.execution_config(cfg, shallow)
    with pytest.raises(ValueError, match="attention_impl"):
        shallow.with_execution(attention_impl="flash")
    # the saved architecture never carries them, and reloading gives the defaults
    d = deep.with_execution(scan_layers=False, remat=True, attention_impl="xla").to_dict()
    assert "scan_layers" not in d and "remat" not in d and "attention_impl" not in d
    assert DecoderConfig.from_dict(d) == deep


def test_unstack_layers_values_and_one_stack_gradient():
    """`decoder.unstack_layers` gives the same per-layer weights as indexing, the same
    gradient, and that gradient is one stack: no zero-padded full-size copy per layer."""
    r = np.random.default_rng(3)
    layers = {"w": jnp.asarray(r.standard_normal((5, 4, 3)), jnp.float32),
              "b": {"s": jnp.asarray(r.standard_normal((5, 3)), jnp.float32)}}
    x = jnp.asarray(r.standard_normal((2, 4)), jnp.float32)

    def run(layers, split):
        per = decoder.unstack_layers(layers, 5) if split else \
            [jax.tree.map(lambda a: a[i], layers) for i in range(5)]
        h = x
        for lp in per:
            h = jnp.tanh(h @ lp["w"] + lp["b"]["s"]) @ lp["w"].T
        return (h ** 2).sum()

    for i, lp in enumerate(decoder.unstack_layers(layers, 5)):
        np.testing.assert_array_equal(lp["w"], layers["w"][i])
        np.testing.assert_array_equal(lp["b"]["s"], layers["b"]["s"][i])
    g_new = jax.grad(run)(layers, True)
    g_ref = jax.grad(run)(layers, False)
    _assert_trees_close(g_new, g_ref, rtol=1e-6, atol_frac=1e-7)
    hlo = lambda split: jax.jit(jax.grad(lambda l: run(l, split))).lower(layers).as_text()
    assert "pad" in hlo(False)          # indexing transposes to pads (the check can fail)
    assert "pad" not in hlo(True)


def test_attention_impl_names_agree():
    from latentr3_jax import config as config_lib
    from latentr3_jax.model import config as model_config
    assert config_lib.ATTENTION_IMPLS == model_config.ATTENTION_IMPLS
