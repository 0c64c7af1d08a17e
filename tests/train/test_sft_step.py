"""The jitted SFT step: accumulation, non-finite skipping, compile count, schedules."""

import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax.parallel import make_mesh
from latentr3_jax.train import optim
from latentr3_jax.train.step import TrainStep

from _sft_helpers import make_sgd_tx, make_tx, new_state, random_batch, sft_loss, tiny_model

MESH1 = {"data": 1, "fsdp": 1, "tensor": 1}


def _mesh():
    return make_mesh(MESH1, devices=jax.devices()[:1])


def test_accumulation_equals_one_big_batch():
    """4 micro-batches via lax.scan give the update of the whole batch (global token mean)."""
    config = tiny_model()
    tx, sched = make_sgd_tx()
    mesh = _mesh()
    batches = [random_batch(i, config.vocab_size) for i in range(2)]
    results = []
    for micro in (1, 4):
        state, sh = new_state(config, tx, mesh)
        step = TrainStep(sft_loss(config), tx, mesh, sh, num_micro_batches=micro, schedule=sched)
        losses = []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        results.append((jax.device_get(state.params), losses, float(m["tokens"])))
    (p1, l1, n1), (p4, l4, n4) = results
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    assert n1 == n4 == batches[-1]["target_mask"].sum()
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the loss is the token mean over the global batch, not a mean of micro-means
    b = batches[0]
    state, _ = new_state(config, tx, mesh)
    s, n, _ = sft_loss(config)(state.params, jax.tree.map(jnp.asarray, b), None)
    np.testing.assert_allclose(l1[0], float(s) / float(n), rtol=1e-5)


def _poison_loss(config):
    base = sft_loss(config)

    def loss_fn(params, batch, rng):
        s, n, aux = base(params, {k: v for k, v in batch.items() if k != "poison"}, rng)
        return s * jnp.mean(batch["poison"]), n, aux
    return loss_fn


def test_non_finite_step_is_skipped_and_counted():
    config = tiny_model()
    tx, sched = make_tx()
    mesh = _mesh()
    state, sh = new_state(config, tx, mesh)
    step = TrainStep(_poison_loss(config), tx, mesh, sh, num_micro_batches=2)
    good = dict(random_batch(0, config.vocab_size), poison=np.ones(8, np.float32))
    bad = dict(good, poison=np.full(8, np.nan, np.float32))
    state, m = step(state, good)
    before = jax.device_get((state.params, state.opt_state))
    for i in range(3):
        state, m = step(state, bad)
        assert not bool(m["finite"]) and int(m["bad_steps"]) == i + 1
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)  # params and optimizer state untouched
    assert int(state.step) == 4 and int(state.total_bad_steps) == 3
    state, m = step(state, good)
    assert bool(m["finite"]) and int(state.bad_steps) == 0 and int(state.total_bad_steps) == 3
    assert np.isfinite(jax.tree.leaves(jax.device_get(state.params))[0]).all()
    assert step.compile_count == 1


def test_compiles_once_per_shape_bucket():
    config = tiny_model()
    tx, _ = make_tx()
    mesh = _mesh()
    state, sh = new_state(config, tx, mesh)
    step = TrainStep(sft_loss(config), tx, mesh, sh)
    shapes = [(12, 6), (16, 6), (12, 6), (16, 6)]
    for i, (P, T) in enumerate(shapes):
        state, _ = step(state, random_batch(i, config.vocab_size, P=P, T=T))
    assert step.compile_count == 2


def test_schedules():
    s = optim.linear_warmup_decay(1.0, 4, 12)
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 8, 12)], [0, 0.5, 1.0, 0.5, 0.0],
                               atol=1e-6)
    c = optim.cosine_warmup(1.0, 2, 10)
    np.testing.assert_allclose([float(c(i)) for i in (0, 1, 2, 6, 10)],
                               [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_latent_only_optimizer_freezes_the_llm():
    config = tiny_model()
    mesh = _mesh()
    sched = optim.cosine_warmup(1e-2, 0, 10)
    tx = optim.adamw(sched, trainable=optim.latent_only)
    state, sh = new_state(config, tx, mesh)
    step = TrainStep(sft_loss(config), tx, mesh, sh)
    before = jax.device_get(state.params)
    state, _ = step(state, random_batch(0, config.vocab_size))
    after = jax.device_get(state.params)
    for k in before:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[k]),
                                                         jax.tree.leaves(after[k])))
        assert same == (k != "latent"), k


def test_latent_lr_scale_multiplies_only_latentratts_update():
    """AdamW's first update is lr * m / (sqrt(v) + eps) per leaf; with lr_scales the
    LatentRATT leaves move `scale` times as far and every other leaf exactly as far."""
    config = tiny_model()
    mesh = _mesh()
    batch = random_batch(0, config.vocab_size)
    moved = {}
    for scale in (1.0, 8.0):
        sched = optim.cosine_warmup(1e-3, 0, 10)
        tx = optim.adamw(sched, grad_clip=0.0, weight_decay=0.1,
                         lr_scales=optim.latent_lr_scales(scale) if scale != 1.0 else None)
        state, sh = new_state(config, tx, mesh)
        before = jax.device_get(state.params)
        state, _ = TrainStep(sft_loss(config), tx, mesh, sh)(state, batch)
        moved[scale] = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - a, before,
                                    jax.device_get(state.params))
    for k in moved[1.0]:
        for a, b in zip(jax.tree.leaves(moved[1.0][k]), jax.tree.leaves(moved[8.0][k])):
            assert np.abs(a).max() > 0, k
            np.testing.assert_allclose(b, a * (8.0 if k == "latent" else 1.0), rtol=2e-3,
                                       atol=1e-9, err_msg=k)


def test_scale_updates_on_hand_made_numbers():
    tx = optim.scale_updates(lambda u: {"a": 3.0, "b": {"c": 1.0}})
    upd = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([0.5])}}
    out, _ = tx.update(upd, tx.init(upd))
    np.testing.assert_array_equal(out["a"], [3.0, -6.0])
    np.testing.assert_array_equal(out["b"]["c"], [0.5])
