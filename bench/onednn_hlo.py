"""Does XLA_FLAGS=--xla_cpu_use_onednn=true change the compiled CPU training step?

Compiles the plain fp32 SFT step of bench_sft.py (AdamW, 'highest' matmul precision,
batch 8, prompt 200 + target 24) at a shape in two processes, without and with the flag,
and records the size, SHA-256 and fusion kinds of each optimised HLO module, and whether
any custom call is a oneDNN one.

    python bench/onednn_hlo.py [--shape smollm2-135m]

Writes bench/results/onednn_hlo_<shape>.json.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys

import common
import bench_sft

FLAG = "--xla_cpu_use_onednn=true"


def worker(shape: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import setup

    config = common.shape_config(shape, 49153 if shape == "smollm2-135m" else 8001)
    # as bench_sft.py times it: model.scan_layers=auto's choice on this backend
    config = config.with_execution(scan_layers=setup.scan_layers_option("auto",
                                                                        config.num_layers))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    B, P, T = 8, 200, 24
    batch = {"prompt_ids": np.ones((B, P), np.int32), "prompt_mask": np.ones((B, P), np.int32),
             "target_ids": np.ones((B, T), np.int32), "target_mask": np.ones((B, T), np.int32)}
    with common.jax_precision("float32"):
        state, step = bench_sft.make_train_step(config, mesh, "plain", jnp.float32)
        text = step.compiled_for(state, step.shard_batch(batch)).as_text()
    return {"scan_layers": bool(config.scan_layers), "hlo_bytes": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "fusion_kinds": dict(collections.Counter(re.findall(r'kind":"(__\w+)"', text))),
            "onednn_custom_calls": len(re.findall(r'custom_call_target="[^"]*onednn', text,
                                                  re.IGNORECASE)),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=("small", "smollm2-135m"))
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        common.emit(worker(args.shape))
        return 0
    arms = {}
    for name, flags in (("default", ""), ("onednn", FLAG)):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
        arms[name] = common.run_worker(__file__, ["--worker", "--shape", args.shape], env)
    same = arms["default"].get("sha256") == arms["onednn"].get("sha256")
    print(json.dumps(arms, indent=1))
    print(f"compiled step identical with and without {FLAG}: {same}")
    common.write_result(os.path.join(common.RESULTS, f"onednn_hlo_{args.shape}.json"),
                        {"shape": args.shape, "flag": FLAG, "arms": arms, "identical": same,
                         "command": f"python bench/onednn_hlo.py --shape {args.shape}",
                         "machine": common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
