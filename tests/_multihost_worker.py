"""One process of the multi-host test: SFT, then LR-GRPO from that SFT run.

    python tests/_multihost_worker.py OUT_JSON LOCAL_DEVICES WORKDIR DATA_DIR TOKENIZER_DIR \
        [--config.distributed.coordinator_address=... --config....]

The CPU device count (and cheap-to-compile XLA flags) are set before jax is imported. The extra arguments are config flags
(the same `--config.a.b=v` syntax as the CLI). Writes a JSON summary to OUT_JSON.
"""

import json
import os
import sys
import time

T0 = time.perf_counter()


def _mark(what):
    print(f"[{time.perf_counter() - T0:7.1f}s] {what}", flush=True)


def main(argv):
    out_path, local_devices, workdir, data_dir, tok_dir = argv[:5]
    flags = argv[5:]
    os.environ["JAX_PLATFORMS"] = "cpu"
    # every process compiles with the same flags; these only make codegen cheaper (the
    # test time is mostly XLA compiles of the 8-device programs)
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={int(local_devices)} "
                               "--xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")

    _mark("start")
    import jax

    from latentr3_jax.utils.atomic import atomic_write_text
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import numpy as np

    from latentr3_jax.config import parse_config
    from latentr3_jax.train import grpo, sft, step

    # record how many rows this process feeds per step and the global batch they form
    fed = []
    shard_batch = step.TrainStep.shard_batch

    def recording_shard_batch(self, batch):
        out = shard_batch(self, batch)
        local = {np.shape(v)[0] for v in batch.values() if not isinstance(v, jax.Array)}
        if local:   # host rows (not arrays already on the devices)
            fed.append([sorted(local), sorted({v.shape[0] for v in out.values()})])
        return out
    step.TrainStep.shard_batch = recording_shard_batch

    common = [
        f"--config.dataset_dir={data_dir}", f"--config.tokenizer.path={tok_dir}",
        "--config.data.synthetic.num_items=40", "--config.data.synthetic.num_users=60",
        "--config.data.buckets=(96,)", "--config.data.target_buckets=(24,)",
        "--config.data.max_target_len=24", "--config.data.max_train_rows=64",
        "--config.data.max_eval_rows=16",
        "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_layers=2", "--config.model.num_heads=4",
        "--config.model.num_kv_heads=2",
        "--config.mesh.data=2", "--config.mesh.fsdp=-1",
    ]
    sft_dir = os.path.join(workdir, "sft")
    cfg, _ = parse_config(common + flags + [
        f"--config.workdir={sft_dir}", "--config.sft.batch_size=16", "--config.sft.max_steps=4",
        "--config.sft.warmup_steps=1", "--config.sft.learning_rate=3e-3",
        "--config.sft.log_every=1", "--config.sft.eval_batch_size=8"])
    _mark("imported")
    sft_summary = sft.train_sft(cfg, progress=False)
    _mark("sft done")
    sft_fed, fed[:] = list(fed), []

    grpo_dir = os.path.join(workdir, "grpo")
    gcfg, _ = parse_config(common + flags + [
        f"--config.workdir={grpo_dir}", f"--config.grpo.init_from={sft_dir}",
        "--config.grpo.group_size=4", "--config.grpo.prompts_per_batch=8",
        "--config.grpo.max_steps=3", "--config.grpo.warmup_steps=1",
        "--config.grpo.learning_rate=1e-2", "--config.grpo.log_every=1",
        "--config.grpo.evaluate=False"])
    grpo_summary = grpo.train_grpo(gcfg, progress=False)
    _mark("grpo done")

    def records(run_dir):
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    result = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count(),
        "sft": {k: sft_summary[k] for k in ("steps", "final_loss", "valid_losses",
                                            "best_valid_loss")},
        "sft_metrics": records(sft_dir), "sft_fed": sft_fed, "grpo_fed": list(fed),
        "grpo": {"curve": grpo_summary["curve"], "batches": grpo_summary["steps"],
                 "valid_reward_start": grpo_summary["valid_reward_start"],
                 "valid_reward_end": grpo_summary["valid_reward_end"]},
        "grpo_metrics": records(grpo_dir),
    }
    atomic_write_text(out_path, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
