"""Sharded training on 8 simulated CPU devices matches one device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from latentr3_jax.parallel import mesh as mesh_lib

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helper modules

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from jax.sharding import PartitionSpec as P
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train.step import TrainStep
    from _sft_helpers import make_tx, new_state, random_batch, sft_loss, tiny_model

    assert jax.device_count() == 8
    config = tiny_model(vocab=97, hidden=32)
    tx, sched = make_tx(lr=1e-2)
    shapes = [(12, 6), (12, 6), (12, 6)]
    out = {}
    for name, m, devs, micro, shp in [
            ("1x1x1", (1, 1, 1), jax.devices()[:1], 1, shapes),
            ("8x1x1", (8, 1, 1), None, 1, shapes),
            ("1x8x1", (1, 8, 1), None, 1, shapes),
            ("2x2x2", (2, 2, 2), None, 2, [(12, 6), (16, 6), (12, 6)])]:
        mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), m)), devices=devs)
        state, sh = new_state(config, tx, mesh)
        step = TrainStep(sft_loss(config), tx, mesh, sh, num_micro_batches=micro, schedule=sched)
        specs = {
            "q_kernel": str(state.params["layers"]["attn"]["q"]["kernel"].sharding.spec),
            "mlp_up": str(state.params["layers"]["mlp"]["up"]["kernel"].sharding.spec),
            "embedding": str(state.params["embed"]["embedding"].sharding.spec),
        }
        mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        mu = [x for x in mu if hasattr(x, "mu")][0].mu
        specs["mu_q_kernel"] = str(mu["layers"]["attn"]["q"]["kernel"].sharding.spec)
        specs["batch"] = str(step.shard_batch(random_batch(0, 97))["prompt_ids"].sharding.spec)
        losses = []
        for i, (Pl, T) in enumerate(shp):
            state, metrics = step(state, random_batch(i if Pl == 12 else 99, 97, P=Pl, T=T))
            losses.append(float(metrics["loss"]))
        out[name] = {"losses": losses, "compiles": step.compile_count, "specs": specs,
                     "param_sum": float(sum(np.abs(np.asarray(x)).sum()
                                            for x in jax.tree.leaves(state.params)))}
    print("RESULT" + json.dumps(out))
""")


def _results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, HERE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_sharded_training():
    """One subprocess for all checks (a module fixture would run once per xdist worker)."""
    results = _results()
    _check_loss_curves(results)
    _check_shardings(results)
    _check_compile_count(results)


def _check_loss_curves(results):
    ref = results["1x1x1"]["losses"]
    for name in ("8x1x1", "1x8x1"):
        assert results[name]["losses"] == pytest.approx(ref, rel=2e-5), name
        assert results[name]["param_sum"] == pytest.approx(results["1x1x1"]["param_sum"], rel=1e-5)
    # 2x2x2 sees a different second batch (another shape bucket); first step must match
    assert results["2x2x2"]["losses"][0] == pytest.approx(ref[0], rel=2e-5)


def _check_shardings(results):
    s = results["1x8x1"]["specs"]
    assert s["q_kernel"] == "P(None, 'fsdp', None, None)"
    assert s["mu_q_kernel"] == s["q_kernel"]          # Adam moments follow their params
    assert s["batch"] == "P(('data', 'fsdp'),)"
    t = results["2x2x2"]["specs"]
    assert t["q_kernel"] == "P(None, 'fsdp', 'tensor', None)"
    assert t["mlp_up"] == "P(None, 'fsdp', 'tensor')"
    # vocab 97 is not divisible by tensor=2: replicated on that dim, embed still on fsdp
    assert t["embedding"] == "P(None, 'fsdp')"
    assert t["batch"] == "P(('data', 'fsdp'),)"
    assert results["8x1x1"]["specs"]["batch"] == "P(('data', 'fsdp'),)"
    assert results["8x1x1"]["specs"]["q_kernel"] == "P(None, None, None, None)"  # pure data parallel


def _check_compile_count(results):
    assert results["1x1x1"]["compiles"] == 1
    assert results["2x2x2"]["compiles"] == 2


def test_logical_rules_table():
    import jax
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    spec = mesh_lib.logical_spec(("layers", "embed", "mlp"), (2, 32, 64), mesh)
    assert tuple(spec) == (None, None, None)  # size-1 mesh axes are dropped
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ValueError):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
