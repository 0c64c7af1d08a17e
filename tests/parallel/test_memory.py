"""The memory estimate against what XLA actually allocates for a compiled training step.

Tolerances: the argument bytes of the compiled step are params + AdamW state + the batch,
so params + opt state must match them exactly (up to the optimizer's scalar step
counters, which the estimate leaves out). Gradients and activations are XLA temporaries;
buffer assignment reuses and fuses buffers, so the estimate is held to a factor of 2 of
`temp_size_in_bytes` (observed 0.8-1.2 on CPU, from this tiny model up to the real
Qwen2.5-1.5B shape). The step is self-contained: embed, a sharding constraint that keeps
the residual stream batch-sharded, the decoder, the vocabulary head on the target tokens
only, cross-entropy, AdamW. Compute is float32: XLA:CPU runs bfloat16 arithmetic in
float32, so its bfloat16 temporaries say nothing about an accelerator's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import tiny_config
from latentr3_jax.parallel import memory
from latentr3_jax.parallel.mesh import batch_sharding, logical_sharding, make_mesh, replicated

COUNTER_SLACK = 64  # bytes: optax step counters (int32 scalars)
TEMP_FACTOR = 2.0

CONFIG = tiny_config(vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=4)


def compiled_step_memory(config, *, batch_per_device, seq_len, target_len, mesh_shape, remat,
                         trainable="all"):
    """Compile one fwd + bwd + AdamW step and return (memory_analysis, batch bytes per device)."""
    mc = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    mesh = make_mesh(mc, jax.devices()[:int(np.prod(mesh_shape))])
    with_latent = trainable == "latent"
    shapes, axes = memory.param_tree_shapes(config, with_latent)
    psh = logical_sharding(axes, mesh, shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh),
                          shapes, psh, is_leaf=lambda x: isinstance(x, tuple))
    opt = optax.adamw(1e-3)
    train_of = (lambda p: p) if trainable == "all" else (lambda p: p["latent"])
    ost = jax.eval_shape(opt.init, train_of(params))
    osh = optax.tree_utils.tree_map_params(
        opt, lambda _, sh: sh, ost, train_of(psh), transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding))
    ost = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), ost, osh)
    bsh = batch_sharding(mesh)
    B, S, T = batch_per_device, seq_len, target_len

    def loss_fn(trained, frozen, ids, mask):
        if trainable == "all":
            p = trained
            x = decoder.embed_tokens(config, p, ids, jnp.float32)
            x = jax.lax.with_sharding_constraint(x, bsh)   # [batch, seq, hidden]
            _, h, _ = decoder.apply(config.with_execution(remat=remat), p, inputs_embeds=x,
                                    attention_mask=mask, return_logits=False)
            logits = decoder.lm_head(config, p, h[:, -T - 1:-1])
        else:  # LR-GRPO shape: frozen prompt cache, only the suffix carries gradients
            p = dict(jax.lax.stop_gradient(frozen), latent=trained)
            logits, _ = latent.latent_forward(config, p, ids[:, :S - T], mask[:, :S - T],
                                              ids[:, S - T:], mask[:, S - T:], num_thoughts=1)
        nll, _ = latent.target_cross_entropy(logits, ids[:, -T:], mask[:, -T:])
        return nll / (ids.shape[0] * T)

    def step(params, opt_state, ids, mask):
        trained = train_of(params)
        frozen = {k: v for k, v in params.items() if k != "latent"}
        loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, ids, mask)
        updates, opt_state = opt.update(grads, opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        params = trained if trainable == "all" else dict(params, latent=trained)
        return params, opt_state, loss

    rows = B * mesh_shape[0] * mesh_shape[1]
    batch = [jax.ShapeDtypeStruct((rows, S), jnp.int32, sharding=bsh)] * 2
    compiled = jax.jit(step, donate_argnums=(0, 1),
                       out_shardings=(psh, osh, replicated(mesh))).lower(params, ost, *batch).compile()
    return compiled.memory_analysis(), 2 * B * S * 4


def measure(mesh_shape, remat, trainable="all", batch_per_device=4, seq_len=112, target_len=16):
    stats, batch_bytes = compiled_step_memory(
        CONFIG, batch_per_device=batch_per_device, seq_len=seq_len, target_len=target_len,
        mesh_shape=mesh_shape, remat=remat, trainable=trainable)
    est = memory.estimate_memory(
        CONFIG, batch_per_device=batch_per_device, seq_len=seq_len, target_len=target_len,
        mesh_shape=mesh_shape, dtype="float32", remat=remat, trainable=trainable,
        with_latent=trainable == "latent")
    return {"state_actual": stats.argument_size_in_bytes - batch_bytes,
            "state_est": est["params_bytes"] + est["opt_state_bytes"],
            "temp_actual": stats.temp_size_in_bytes,
            "temp_est": est["grads_bytes"] + est["activations_bytes"]}


def check(m):
    assert abs(m["state_actual"] - m["state_est"]) <= COUNTER_SLACK, m
    ratio = m["temp_actual"] / m["temp_est"]
    assert 1 / TEMP_FACTOR <= ratio <= TEMP_FACTOR, (ratio, m)


# --------------------------------------------------------------------------- pure estimate


def test_params_bytes_equal_the_real_parameter_tree():
    real = jax.eval_shape(lambda: dict(decoder.init_params(CONFIG, jax.random.key(0)),
                                       latent=latent.init_latent_params(CONFIG, jax.random.key(1))))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(real))
    est = memory.estimate_memory(CONFIG, batch_per_device=1, seq_len=8)
    assert est["params_bytes"] == nbytes
    assert est["opt_state_bytes"] == 2 * nbytes and est["grads_bytes"] == nbytes
    assert est["total_bytes"] == sum(est[k] for k in ("params_bytes", "opt_state_bytes",
                                                      "grads_bytes", "activations_bytes"))
    lat = memory.estimate_memory(CONFIG, batch_per_device=1, seq_len=8, trainable="latent")
    lat_bytes = sum(x.size * 4 for x in jax.tree.leaves(real["latent"]))
    assert lat["params_bytes"] == nbytes and lat["grads_bytes"] == lat_bytes
    assert lat["opt_state_bytes"] == 2 * lat_bytes


def test_sharding_divides_only_what_the_mesh_divides():
    # q kernel [L, d, H, hd] = ('layers', 'embed', 'heads', 'head_dim'): embed -> fsdp, heads -> tensor
    assert memory.sharded_shape((4, 128, 4, 32), ("layers", "embed", "heads", "head_dim"),
                                (2, 4, 2)) == (4, 32, 2, 32)
    # 2 KV heads cannot split 4 ways: replicated, like the real sharding
    assert memory.sharded_shape((4, 128, 2, 32), ("layers", "embed", "kv_heads", "head_dim"),
                                (1, 1, 4)) == (4, 128, 2, 32)
    one = memory.estimate_memory(CONFIG, batch_per_device=2, seq_len=16)
    fsdp = memory.estimate_memory(CONFIG, batch_per_device=2, seq_len=16, mesh_shape=(1, 8, 1))
    assert fsdp["params_bytes"] < one["params_bytes"] / 4  # only norms stay replicated
    remat = memory.estimate_memory(CONFIG, batch_per_device=2, seq_len=16, remat=True)
    assert remat["activations_bytes"] < one["activations_bytes"]
    with pytest.raises(ValueError, match="trainable"):
        memory.estimate_memory(CONFIG, batch_per_device=1, seq_len=8, trainable="lora")


def test_qwen_1_5b_parameter_count():
    cfg = memory.qwen25_1_5b(vocab_size=151936)
    assert abs(cfg.num_params() - 1.544e9) < 0.01e9  # Qwen2.5-1.5B: 1.54B parameters


# --------------------------------------------------------------------------- vs XLA


def test_one_device_matches_compiled_step():
    check(measure((1, 1, 1), False, batch_per_device=8))


def test_qwen_1_5b_scale_matches_compiled_step():
    """The paper model's real shape (28 layers, vocab 151937), compiled ahead of time only:
    a 512-token prompt + thought + 64 target tokens, 2 rows, remat as in the paper configs."""
    stats, batch_bytes = compiled_step_memory(memory.qwen25_1_5b(), batch_per_device=2,
                                              seq_len=577, target_len=65, mesh_shape=(1, 1, 1),
                                              remat=True)
    est = memory.estimate_memory(memory.qwen25_1_5b(), batch_per_device=2, seq_len=577,
                                 target_len=65, remat=True, with_latent=False)
    check({"state_actual": stats.argument_size_in_bytes - batch_bytes,
           "state_est": est["params_bytes"] + est["opt_state_bytes"],
           "temp_actual": stats.temp_size_in_bytes,
           "temp_est": est["grads_bytes"] + est["activations_bytes"]})


def test_latent_only_step_matches_compiled_step():
    check(measure((1, 1, 1), False, trainable="latent", batch_per_device=8))


def test_2x2x2_mesh_matches_compiled_step():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, __file__, "2,2,2"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for m in json.loads(out.stdout.strip().splitlines()[-1]):
        check(m)


if __name__ == "__main__":  # the 8-device subprocess
    shape = tuple(int(s) for s in sys.argv[1].split(","))
    print(json.dumps([measure(shape, False)]))
