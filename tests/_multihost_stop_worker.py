"""One process of the multi-host stop test: SFT where only process 1 gets a SIGTERM.

    python tests/_multihost_stop_worker.py OUT_JSON LOCAL_DEVICES WORKDIR DATA_DIR TOKENIZER_DIR \
        SIGNAL_AT_CALL [--config....]

Process 1 sends itself SIGTERM during its SIGNAL_AT_CALL-th train step; process 0 gets no
signal. Both must stop at the same step (the next logging step), save, and then resume in
the same process to the end. Writes a JSON summary to OUT_JSON.
"""

import json
import os
import signal
import sys


def main(argv):
    out_path, local_devices, workdir, data_dir, tok_dir, signal_at = argv[:6]
    flags = argv[6:]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={int(local_devices)} "
                               "--xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    import jax

    from latentr3_jax.utils.atomic import atomic_write_text
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    from latentr3_jax.config import parse_config
    from latentr3_jax.train import sft, step
    from latentr3_jax.train.signals import StopRequested

    calls = []
    call = step.TrainStep.__call__

    def signalling_call(self, *a, **kw):
        calls.append(1)
        if jax.process_index() == 1 and len(calls) == int(signal_at):
            os.kill(os.getpid(), signal.SIGTERM)
        return call(self, *a, **kw)
    step.TrainStep.__call__ = signalling_call

    cfg, _ = parse_config([
        f"--config.dataset_dir={data_dir}", f"--config.tokenizer.path={tok_dir}",
        "--config.data.synthetic.num_items=40", "--config.data.synthetic.num_users=60",
        "--config.data.buckets=(96,)", "--config.data.target_buckets=(24,)",
        "--config.data.max_target_len=24", "--config.data.max_train_rows=64",
        "--config.data.max_eval_rows=0",
        "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_layers=1", "--config.model.num_heads=4",
        "--config.model.num_kv_heads=2", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
        f"--config.workdir={os.path.join(workdir, 'sft')}", "--config.sft.batch_size=16",
        "--config.sft.max_steps=6", "--config.sft.warmup_steps=1", "--config.sft.log_every=2",
        "--config.sft.checkpoint_every=100", *flags])
    result = {}
    try:
        sft.train_sft(cfg, progress=False)
        result["stopped"] = None
    except StopRequested as e:
        result["stopped"] = {"step": e.step, "signal": e.signame}
    summary = sft.train_sft(cfg, progress=False)   # the same command again: resume
    result["process_index"] = jax.process_index()
    result["resumed"] = {"start_step": summary["start_step"], "steps": summary["steps"]}
    atomic_write_text(out_path, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
