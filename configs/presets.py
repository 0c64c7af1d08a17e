"""Shared pieces of the paper configs: datasets, the release's hyperparameters, variants and
mesh presets. The config files (`paper_*.py`) load this module by path and call
`paper_config(dataset, arg)`; it is not a config file itself.

Variant argument (after a colon: `--config configs/paper_toys.py:bigrec,base,tpu-v5e-8`),
comma-separated, in any order:
  d3 | bigrec          recipe: D3 template + constrained beam search (default), or the
                       BIGRec Alpaca template + L2 grounding of one generated title;
  latent | base        LatentR³ with one thought token (default), or the plain SFT
                       baseline without a thought (num_thoughts = 0);
  <mesh preset>        one of MESH_PRESETS (default: all devices as one FSDP axis).
"""

from __future__ import annotations

from latentr3_jax.config import base_config

HF_PATH_PLACEHOLDER = "/path/to/Qwen2.5-1.5B"
DATA_ROOT_PLACEHOLDER = "/path/to/amazon18"

# short name -> (D3 folder name, category word of the prompt; SPEC.md section 3)
DATASETS = {
    "cds": ("CDs_and_Vinyl", "musics"),
    "toys": ("Toys_and_Games", "toys and games"),
    "games": ("Video_Games", "video games"),
    "instruments": ("Musical_Instruments", "music instruments"),
}

# Mesh presets for full fine-tuning of a 1.5B model. The float32 weights, AdamW moments and
# gradients take ~25 GB, more than a v4 or v5e chip holds next to the activations, so the
# presets shard them with FSDP over 4-8 devices (all-gathers over ICI / NVLink) and keep
# tensor = 1: Qwen2.5-1.5B has only 2 KV heads and a 1536-wide residual stream, too small
# for tensor parallelism to pay off. v5p-16 has memory to spare and two hosts, so it
# replicates over 2 groups of 4 (data = 2), which halves the FSDP all-gathers' fan-out.
# `devices` is what jax.device_count() reports (TPU v4/v5p: one device per chip).
MESH_PRESETS = {
    "tpu-v4-8": dict(data=1, fsdp=4, tensor=1, devices=4, hosts=1, hbm_gib=32,
                     accelerator_type="v4-8", runtime_version="tpu-ubuntu2204-base"),
    "tpu-v5e-8": dict(data=1, fsdp=8, tensor=1, devices=8, hosts=1, hbm_gib=16,
                      accelerator_type="v5litepod-8", runtime_version="v2-alpha-tpuv5-lite"),
    "tpu-v5p-16": dict(data=2, fsdp=4, tensor=1, devices=8, hosts=2, hbm_gib=95,
                       accelerator_type="v5p-16", runtime_version="v2-alpha-tpuv5"),
    "gpu-h100x8": dict(data=1, fsdp=8, tensor=1, devices=8, hosts=1, hbm_gib=80,
                       accelerator_type="8xH100", runtime_version=""),
}

VARIANT_RECIPES = ("d3", "bigrec")
VARIANT_THOUGHTS = {"latent": 1, "base": 0}


def apply_mesh_preset(cfg, name: str):
    """Set cfg.mesh to the preset's (data, fsdp, tensor)."""
    if name not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {name!r}; known: {sorted(MESH_PRESETS)}")
    p = MESH_PRESETS[name]
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = p["data"], p["fsdp"], p["tensor"]
    return cfg


def parse_variant(arg) -> dict:
    """'bigrec,base,tpu-v4-8' -> {'recipe': 'bigrec', 'thoughts': 0, 'mesh': 'tpu-v4-8'}."""
    out = {"recipe": "d3", "thoughts": 1, "mesh": ""}
    for token in [t.strip() for t in str(arg or "").split(",") if t.strip()]:
        if token in VARIANT_RECIPES:
            out["recipe"] = token
        elif token in VARIANT_THOUGHTS:
            out["thoughts"] = VARIANT_THOUGHTS[token]
        elif token in MESH_PRESETS:
            out["mesh"] = token
        else:
            raise ValueError(f"unknown config variant {token!r}; known: "
                             f"{list(VARIANT_RECIPES) + list(VARIANT_THOUGHTS) + sorted(MESH_PRESETS)}")
    return out


def paper_config(dataset: str, arg=None):
    """Qwen2.5-1.5B on one Amazon category with the release's hyperparameters."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    folder, category = DATASETS[dataset]
    v = parse_variant(arg)
    c = base_config()
    tag = f"{dataset}_{v['recipe']}_{'latent' if v['thoughts'] else 'base'}"
    c.workdir = f"runs/qwen2.5-1.5b_{tag}"     # a gs:// path works too (Orbax)

    c.dataset = "d3"
    c.dataset_dir = f"{DATA_ROOT_PLACEHOLDER}/{folder}"
    c.data.category = category
    c.data.cutoff = 512
    c.data.buckets = (128, 256, 512)
    c.data.max_target_len = 64                  # titles are <= 20 words; Qwen tokens + quotes
    c.data.target_buckets = (16, 32, 64)

    # Qwen2.5-1.5B, full fine-tune in bfloat16 compute (float32 master weights)
    c.model.hf_path = HF_PATH_PLACEHOLDER
    c.tokenizer.path = ""                       # the checkpoint's own tokenizer
    c.model.num_thoughts = v["thoughts"]
    c.model.latent_mode = "ratt"
    c.model.dtype = "bfloat16"
    c.model.remat = True

    # Stage 1 (SPEC.md section 5): AdamW 3e-4, 20 warmup steps then linear decay,
    # global batch 128, <= 3 epochs with per-epoch validation, patience 1, keep the best.
    c.sft.learning_rate = 3e-4
    c.sft.warmup_steps = 20
    c.sft.batch_size = 128
    c.sft.epochs = 3
    c.sft.patience = 1
    c.sft.weight_decay = 0.0

    # Stage 2 (SPEC.md section 6): LR-GRPO, G = 8, sigma 1.5, 32 prompts x 8 per batch,
    # cosine schedule with 200 warmup steps, lr 5e-5, clip 0.2 / 0.28, beta 0, one epoch.
    c.grpo.group_size = 8
    c.grpo.sigma = 1.5
    c.grpo.prompts_per_batch = 32
    c.grpo.learning_rate = 5e-5
    c.grpo.warmup_steps = 200
    c.grpo.clip_low = 0.2
    c.grpo.clip_high = 0.28
    c.grpo.kl_beta = 0.0
    c.grpo.epochs = 1
    c.grpo.advantage = "batch"
    c.grpo.train_llm = False

    # Evaluation (SPEC.md section 7)
    if v["recipe"] == "d3":
        c.data.template = "latentr3"
        c.eval.mode = "constrained"
        c.eval.num_beams = 10
        c.eval.length_penalty = 1.0
    else:
        c.data.template = "bigrec"
        c.eval.mode = "bigrec"                  # one title from a 4-beam search, then grounding
        c.eval.grounding_beams = 4
        c.eval.max_new_tokens = c.data.max_target_len
        c.eval.length_penalty = 1.0

    # Mesh: all devices as one FSDP axis unless a preset is named.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    if v["mesh"]:
        apply_mesh_preset(c, v["mesh"])
    return c


def memory_table(dataset: str = "cds") -> str:
    """The per-preset memory table that every paper config carries in its docstring."""
    from latentr3_jax.parallel import memory
    model = memory.qwen25_1_5b()
    rows = ["| preset | mesh d,f,t | step | rows/dev | params | opt state | grads | activations "
            "| total | HBM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in MESH_PRESETS.items():
        est = memory.config_estimates(paper_config(dataset, name), p["devices"], decoder_config=model)
        mesh = ",".join(str(s) for s in est["mesh"])
        for step in ("sft", "grpo"):
            e = est[step]
            vals = [e[k] / memory.GIB for k in ("params_bytes", "opt_state_bytes", "grads_bytes",
                                                 "activations_bytes", "total_bytes")]
            rows.append(f"| {name} | {mesh} | {step} | {est['rows'][step]} | "
                        + " | ".join(f"{x:.1f}" for x in vals) + f" | {p['hbm_gib']} |")
    return "\n".join(rows)


TABLE_BEGIN = "Memory per device (GiB)"
TABLE_END = "(end of memory table)"


def _table_block(dataset: str) -> str:
    return (f"{TABLE_BEGIN}, worst-case bucket (prompt 512 + thought + target 64), bfloat16\n"
            "compute with remat, float32 weights / AdamW / grads; from\n"
            "latentr3_jax.parallel.memory.estimate_memory (regenerate: python configs/presets.py):\n\n"
            + memory_table(dataset) + f"\n\n{TABLE_END}")


def rewrite_docstrings(config_dir: str) -> list:
    """Refresh the memory table in every paper config's docstring; returns the files changed."""
    import os
    changed = []
    for dataset in DATASETS:
        path = os.path.join(config_dir, f"paper_{dataset}.py")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        i, j = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
        new = text[:i] + _table_block(dataset) + text[j:]
        if new != text:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(new)
            changed.append(path)
    return changed


if __name__ == "__main__":
    import os
    for p in rewrite_docstrings(os.path.dirname(os.path.abspath(__file__))):
        print("updated", p)
