"""The generic jitted training step, shared by SFT and GRPO.

`loss_fn(params, micro_batch, rng) -> (loss_sum, token_count, aux)` returns a *sum* over
tokens, so the step can take the token mean over the whole global batch however it is cut
into micro-batches. Gradient accumulation is a `lax.scan` inside the step. A non-finite
loss or gradient skips the update (decided on device with `jnp.where`) and bumps a counter
in the state; the host reads that counter one step late, so nothing waits per step.

Two options for stages that need them: `extra`, a third argument of the step (constants
such as frozen starting weights) passed on to the loss; and a `probe`, a second objective
whose gradient is only compared with the loss's (its cosine), on the steps a predicate of
the step number picks, inside the same compiled step (`lax.cond`: other steps skip it).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from latentr3_jax.parallel import mesh as mesh_lib
from latentr3_jax.train.state import TrainState

log = logging.getLogger(__name__)

LossFn = Callable[[Any, dict, jax.Array], tuple]
PROBE_KEYS = ("probe_on", "probe_grad_cos", "probe_update_cos")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def split_micro(x: jax.Array, num_micro: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...] taking rows m, m+M, m+2M, ... into micro-batch m, so every
    device's contiguous batch shard holds an equal part of each micro-batch."""
    b = x.shape[0]
    y = x.reshape((b // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_cosine(a, b) -> jax.Array:
    """Cosine between two pytrees of the same structure, as flat vectors (0 if one is 0)."""
    dot = sum(jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return dot / jnp.maximum(optax.global_norm(a) * optax.global_norm(b), 1e-30)


def make_step_fn(loss_fn: LossFn, tx: optax.GradientTransformation, *, num_micro_batches: int = 1,
                 micro_sharding: Optional[NamedSharding] = None,
                 schedule: Optional[optax.Schedule] = None, probe: Optional[LossFn] = None,
                 probe_when: Optional[Callable[[jax.Array], jax.Array]] = None):
    """The pure (un-jitted) step: (state, batch[, extra]) -> (state, metrics).

    With `extra`, the loss is called as loss_fn(params, micro_batch, rng, extra). With a
    `probe` (same signature and token-sum convention as a 3-argument loss), on the steps
    where `probe_when(state.step)` holds (every step if None) the metrics get
    probe_on = True, probe_grad_cos = cos(loss gradient, probe gradient) and
    probe_update_cos = cos(applied update, -probe gradient); elsewhere False, 0, 0.
    """
    M = max(int(num_micro_batches), 1)

    def split(batch):
        micro = jax.tree.map(lambda x: split_micro(x, M), batch)
        if micro_sharding is not None:
            micro = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x, NamedSharding(micro_sharding.mesh, PartitionSpec(None, *micro_sharding.spec))),
                micro)
        return micro

    def probe_gradient(params, batch, rng):
        """The probe's gradient over the whole batch, accumulated like the loss's."""
        pg = jax.grad(lambda p, b, r: _scalar_parts(probe(p, b, r)), has_aux=True)
        if M == 1:
            g, (count, _) = pg(params, batch, rng)
        else:
            def body(acc, xs):
                mb, i = xs
                g_i, (c_i, _) = pg(params, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, acc[0], g_i), acc[1] + c_i), None
            acc0 = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            (g, count), _ = jax.lax.scan(body, acc0, (split(batch), jnp.arange(M)))
        return jax.tree.map(lambda x: x / jnp.maximum(count, 1.0), g)

    def step(state: TrainState, batch: dict, extra=None):
        more = () if extra is None else (extra,)
        grad_fn = jax.value_and_grad(lambda p, b, r: _scalar_parts(loss_fn(p, b, r, *more)),
                                     has_aux=True)
        rng = jax.random.fold_in(state.rng, state.step)
        if M == 1:
            (loss_sum, (count, aux)), grads = grad_fn(state.params, batch, rng)
        else:
            micro = split(batch)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            aux0 = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                                  rng)[0][1][1]
            acc0 = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0))

            def body(acc, xs):
                mb, i = xs
                (ls, (cnt, ax)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                g_acc, l_acc, c_acc, a_acc = acc
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + ls, c_acc + cnt,
                        jax.tree.map(jnp.add, a_acc, ax)), None

            (grads, loss_sum, count, aux), _ = jax.lax.scan(body, acc0, (micro, jnp.arange(M)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(grads)

        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, new_opt = tx.update(safe_grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        bad = jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            bad_steps=bad,
            total_bad_steps=state.total_bad_steps + (~finite).astype(jnp.int32))
        metrics = {"step": new_state.step, "loss": loss, "tokens": count, "grad_norm": grad_norm,
                   "finite": finite, "bad_steps": bad,
                   "total_bad_steps": new_state.total_bad_steps, **aux}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        if probe is not None:
            def run_probe(_):
                d = probe_gradient(state.params, batch, rng)
                return {"probe_on": jnp.array(True), "probe_grad_cos": tree_cosine(grads, d),
                        "probe_update_cos": -tree_cosine(updates, d)}

            def skip_probe(_):
                zero = jnp.zeros((), jnp.float32)
                return {"probe_on": jnp.array(False), "probe_grad_cos": zero,
                        "probe_update_cos": zero}

            when = jnp.array(True) if probe_when is None else probe_when(state.step)
            metrics.update(jax.lax.cond(when, run_probe, skip_probe, None))
        return new_state, metrics

    return step


def _scalar_parts(out):
    loss_sum, count, aux = out
    aux = {} if aux is None else aux
    return jnp.asarray(loss_sum, jnp.float32), (jnp.asarray(count, jnp.float32), aux)


def _shape_key(batch) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


class TrainStep:
    """A jitted step with in/out shardings and a donated state, compiled once per batch
    shape (one per bucket pair) ahead of time; `compile_count` says how many times."""

    def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                 shardings: TrainState, *, num_micro_batches: int = 1,
                 schedule: Optional[optax.Schedule] = None, donate: bool = True,
                 extra_shardings: Any = None, probe: Optional[LossFn] = None,
                 probe_when: Optional[Callable[[jax.Array], jax.Array]] = None):
        """`extra_shardings`: the shardings of the step's third argument (then required on
        every call); `probe`, `probe_when`: see make_step_fn."""
        self.mesh = mesh
        self.shardings = shardings
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self.num_micro_batches = max(int(num_micro_batches), 1)
        self.takes_extra = extra_shardings is not None
        fn = make_step_fn(loss_fn, tx, num_micro_batches=self.num_micro_batches,
                          micro_sharding=self.batch_sharding, schedule=schedule, probe=probe,
                          probe_when=probe_when)
        in_shardings = (shardings, self.batch_sharding)
        if self.takes_extra:
            in_shardings += (extra_shardings,)
        else:
            fn = _without_extra(fn)
        self._jitted = jax.jit(fn, in_shardings=in_shardings,
                               out_shardings=(shardings, mesh_lib.replicated(mesh)),
                               donate_argnums=(0,) if donate else ())
        self._compiled: dict = {}
        self.compile_count = 0

    def shard_batch(self, batch: dict) -> dict:
        """Host numpy batch (this process's rows) -> global arrays sharded over the batch axes."""
        out = {}
        for k, v in batch.items():
            if isinstance(v, jax.Array) and v.sharding == self.batch_sharding:
                out[k] = v
            else:
                out[k] = jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
        return out

    def _args(self, state: TrainState, batch: dict, extra) -> tuple:
        if self.takes_extra != (extra is not None):
            raise ValueError("this step takes an extra argument" if self.takes_extra
                             else "this step takes no extra argument")
        return (state, batch, extra) if self.takes_extra else (state, batch)

    def compiled_for(self, state: TrainState, batch: dict, extra=None):
        args = self._args(state, batch, extra)
        key = _shape_key(batch)
        exe = self._compiled.get(key)
        if exe is None:
            B = next(iter(batch.values())).shape[0]
            need = self.num_micro_batches * mesh_lib.batch_size_multiple(self.mesh)
            if B % need:
                raise ValueError(f"global batch {B} must be a multiple of micro-batches x batch "
                                 f"devices = {need}")
            with jax.set_mesh(self.mesh):  # lets the model constrain activations to the batch axes
                exe = self._jitted.lower(*args).compile()
            self._compiled[key] = exe
            self.compile_count += 1
            if self.compile_count == 1:
                log.info("%s", describe_memory(exe))
        return exe

    def __call__(self, state: TrainState, batch: dict, extra=None):
        batch = self.shard_batch(batch)
        return self.compiled_for(state, batch, extra)(*self._args(state, batch, extra))


def _without_extra(fn):
    """`fn(state, batch, extra=None)` as a two-argument function (for jit's in_shardings)."""
    def step(state, batch):
        return fn(state, batch)
    return step


def describe_memory(compiled) -> str:
    """One line of a compiled step's device memory (per device), as XLA reports it."""
    try:
        m = compiled.memory_analysis()
        mib = lambda n: f"{n / 2**20:,.1f} MiB"
        return (f"compiled train step, per device: arguments {mib(m.argument_size_in_bytes)}, "
                f"outputs {mib(m.output_size_in_bytes)} ({mib(m.alias_size_in_bytes)} aliased), "
                f"temporaries {mib(m.temp_size_in_bytes)}, code {mib(m.generated_code_size_in_bytes)}")
    except Exception as e:  # not every backend reports it
        return f"compiled train step (no memory analysis on this backend: {type(e).__name__})"
