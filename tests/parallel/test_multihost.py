"""Multi-host: 2 processes x 4 CPU devices (gloo collectives over localhost) train exactly
like 1 process x 8 devices: same SFT losses, validation loss, and LR-GRPO losses/rewards.

Each process feeds only its own slice of every global batch (BatchIterator with the
process index/count), and both write checkpoints into the same run directory.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from latentr3_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "_multihost_worker.py")
STOP_WORKER = os.path.join(REPO, "tests", "_multihost_stop_worker.py")
TIMEOUT_S = 420


# --------------------------------------------------------------------------- settings


def test_initialize_kwargs_from_config_then_environment(monkeypatch):
    import ml_collections
    for k in (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
              "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    d = lambda **kw: ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1, **kw})
    assert distributed.initialize_kwargs(d()) is None
    assert distributed.initialize_kwargs(d(coordinator_address="h:1", num_processes=2,
                                           process_id=1)) == \
        {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv(distributed.ENV_ADDRESS, "10.0.0.2:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.initialize_kwargs(d()) == \
        {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}
    # the config wins field by field
    assert distributed.initialize_kwargs(d(process_id=0)) == \
        {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 0}
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "4")
    with pytest.raises(ValueError, match="outside 0..3"):
        distributed.initialize_kwargs(d())
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.initialize_kwargs(d())
    monkeypatch.delenv(distributed.ENV_ADDRESS)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID)
    with pytest.raises(ValueError, match="no coordinator address"):
        distributed.initialize_kwargs(d())


# --------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(root):
    """The synthetic dataset and a tokenizer, made once so the workers only read them."""
    from latentr3_jax import data
    from latentr3_jax.config import base_config
    from latentr3_jax.data.synthetic import write_synthetic
    c = base_config()
    c.dataset_dir = os.path.join(root, "data")
    c.data.synthetic.num_items, c.data.synthetic.num_users = 40, 60
    write_synthetic(c.dataset_dir, num_items=40, num_users=60, seed=0)
    ds = data.load_dataset(c)
    tok = data.train_tokenizer(data.tokenizer_corpus(ds, c.data.template), 300)
    tok_dir = os.path.join(root, "tokenizer")
    tok.save(tok_dir)
    return c.dataset_dir, tok_dir


def _start(out, local_devices, workdir, data_dir, tok_dir, flags, log, extra_env=None,
           worker=WORKER, worker_args=()):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("XLA_FLAGS", distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID):
        env.pop(k, None)
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, worker, str(out), str(local_devices), str(workdir),
                             data_dir, tok_dir, *worker_args, *flags], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)


def _run_all(tmp_path, runs, data_dir, tok_dir, worker=WORKER, worker_args=()):
    """Start every (name, local devices, workdir, flags, env) process, wait for all, and
    return name -> the JSON each wrote. One failed process fails the test at once (its
    peers would wait on collectives until the timeout)."""
    jobs = {}   # name -> (process, out json, log path)
    try:
        for name, devices, workdir, flags, extra_env in runs:
            log_path = tmp_path / f"{name}.log"
            out = tmp_path / f"{name}.json"
            with open(log_path, "w") as log:
                jobs[name] = (_start(out, devices, workdir, data_dir, tok_dir, flags, log,
                                     extra_env, worker, worker_args), out, log_path)
        deadline = time.monotonic() + TIMEOUT_S
        while any(proc.poll() is None for proc, _, _ in jobs.values()):
            for name, (proc, _, log_path) in jobs.items():
                rc = proc.poll()
                assert rc in (None, 0), f"{name} exited with {rc}:\n{_tail(log_path)}"
            if time.monotonic() > deadline:
                late = [n for n, (p, _, _) in jobs.items() if p.poll() is None]
                pytest.fail(f"{late} did not finish in {TIMEOUT_S}s:\n"
                            + "\n".join(_tail(jobs[n][2]) for n in late))
            time.sleep(0.5)
        for name, (proc, _, log_path) in jobs.items():
            assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{_tail(log_path)}"
    finally:
        for proc, _, _ in jobs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: json.loads(out.read_text()) for name, (_, out, _) in jobs.items()}


def _two_hosts(address, workdir):
    """Process 0 joins through config flags (as launch/ passes them), process 1 through the
    JAX_* environment variables."""
    return [("multi0", 4, workdir,
             [f"--config.distributed.coordinator_address={address}",
              "--config.distributed.num_processes=2", "--config.distributed.process_id=0"], {}),
            ("multi1", 4, workdir, [],
             {distributed.ENV_ADDRESS: address, distributed.ENV_NUM_PROCESSES: "2",
              distributed.ENV_PROCESS_ID: "1"})]


def _tail(path, n=4000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    data_dir, tok_dir = _prepare(str(tmp_path))
    address = f"127.0.0.1:{_free_port()}"
    runs = [("single", 8, tmp_path / "single", [], {}), *_two_hosts(address, tmp_path / "multi")]
    res = _run_all(tmp_path, runs, data_dir, tok_dir)
    one, m0, m1 = res["single"], res["multi0"], res["multi1"]
    assert (one["process_count"], one["local_devices"], one["devices"]) == (1, 8, 8)
    for i, m in enumerate((m0, m1)):
        assert (m["process_index"], m["process_count"], m["local_devices"], m["devices"]) == \
            (i, 2, 4, 8)
    assert m1["sft_metrics"] is not None    # the shared run directory, written by process 0
    # each process fed half of every global batch; the single process fed all of it
    assert one["sft_fed"] and all(f == [[16], [16]] for f in one["sft_fed"])
    for m in (m0, m1):
        assert len(m["sft_fed"]) == len(one["sft_fed"])
        assert all(f == [[8], [16]] for f in m["sft_fed"]), m["sft_fed"]
        assert len(m["grpo_fed"]) == len(one["grpo_fed"]) == 3
        assert all(f == [[4], [8]] for f in m["grpo_fed"]), m["grpo_fed"]

    tol = dict(rtol=2e-5, atol=1e-6)
    # SFT: every step's loss and gradient norm, and the validation loss
    train = lambda r: [x for x in r["sft_metrics"] if x.get("split") == "train"]
    t_one, t_multi = train(one), train(m0)
    assert [x["step"] for x in t_one] == [x["step"] for x in t_multi] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "target_tokens"):
        np.testing.assert_allclose([x[key] for x in t_multi], [x[key] for x in t_one],
                                   err_msg=f"sft {key}", **tol)
    assert t_one[-1]["loss"] < t_one[0]["loss"]    # it trained
    np.testing.assert_allclose(m0["sft"]["best_valid_loss"], one["sft"]["best_valid_loss"], **tol)
    # both processes see the same replicated metrics
    assert m1["sft"]["final_loss"] == m0["sft"]["final_loss"]

    # LR-GRPO from each setup's own SFT run
    c_one, c_multi = one["grpo"]["curve"], m0["grpo"]["curve"]
    assert len(c_one) == len(c_multi) == 3
    for key in ("loss", "reward_mean", "reward_eps0", "adv_std", "grad_norm", "count"):
        np.testing.assert_allclose([x[key] for x in c_multi], [x[key] for x in c_one],
                                   err_msg=f"grpo {key}", rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m0["grpo"]["valid_reward_end"], one["grpo"]["valid_reward_end"],
                               rtol=1e-4, atol=1e-5)
    assert [x["loss"] for x in m1["grpo"]["curve"]] == [x["loss"] for x in c_multi]


@pytest.mark.slow
def test_a_signal_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    """Only process 1 gets SIGTERM, during step 3. Both stop after step 4 (the next logging
    step, sft.log_every=2), save, and the same command resumes both to the end. Without the
    agreement, process 1 would stop alone and process 0 would hang in step 4's collectives."""
    data_dir, tok_dir = _prepare(str(tmp_path))
    address = f"127.0.0.1:{_free_port()}"
    res = _run_all(tmp_path, _two_hosts(address, tmp_path / "run"), data_dir, tok_dir,
                   worker=STOP_WORKER, worker_args=("3",))
    for name in ("multi0", "multi1"):
        assert res[name]["stopped"] == {"step": 4, "signal": "SIGTERM"}, res[name]
        assert res[name]["resumed"] == {"start_step": 4, "steps": 6}, res[name]
    with open(tmp_path / "run" / "sft" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in recs if r.get("split") == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["signal"]) for r in recs if r.get("event") == "stopped"] == [(4, "SIGTERM")]


def test_should_stop_waits_for_the_sync_step_on_several_processes(monkeypatch):
    """The agreement schedule, with the exchange replaced by a stand-in for the other host."""
    import signal as signal_mod

    from jax.experimental import multihost_utils

    from latentr3_jax.train.signals import GracefulStop
    other = {"code": 0}
    seen = []

    def allgather(x):
        seen.append(int(x))
        return np.array([int(x), other["code"]], np.int32)

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    stop = GracefulStop(sync_every=3, process_count=2)
    assert [stop.should_stop(s) for s in (1, 2, 3)] == [False, False, False]
    other["code"] = int(signal_mod.SIGTERM)           # the other host was signalled
    assert [stop.should_stop(s) for s in (4, 5)] == [False, False]   # not a sync step
    assert stop.should_stop(6) and stop.received == "SIGTERM" and stop.requested
    assert seen == [0, 0]                              # exchanged at steps 3 and 6 only
    # one process: the local flag, no exchange
    single = GracefulStop(sync_every=3, process_count=1)
    assert not single.should_stop(3)
    single.received = "SIGINT"
    assert single.should_stop(1) and seen == [0, 0]
