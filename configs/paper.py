"""Qwen2.5-1.5B on one Amazon category, the release's recipe.

The dataset goes after a colon; variants follow it, comma-separated, in any order:
  latentr3 run --config configs/paper.py:cds \\
      --config.model.hf_path=/models/Qwen2.5-1.5B \\
      --config.dataset_dir=/data/amazon18/CDs_and_Vinyl --config.workdir=gs://bucket/runs/cds

Datasets (D3 folder; category word of the prompt, SPEC.md section 3):
  cds           CDs_and_Vinyl               musics
  toys          Toys_and_Games              toys and games
  games         Video_Games                 video games
  instruments   Musical_Instruments         music instruments
  industrial    Industrial_and_Scientific   industrial and scientific
  office        Office_Products             office products
The paper reports the first four; ../shared/data/amazon18 holds cds, industrial and office.

Stage 1 SFT: AdamW 3e-4, 20 warmup steps then linear decay, global batch 128, <= 3 epochs
with early stopping (patience 1), bfloat16, prompt cutoff 512. Stage 2 LR-GRPO: G = 8,
sigma 1.5, 32 prompts x 8, cosine schedule with 200 warmup steps, lr 5e-5, clip 0.2 / 0.28,
beta 0, one epoch. Evaluation: constrained beam search, 10 beams, length penalty 1.0.

Variants:
  configs/paper.py:cds,bigrec        BIGRec template + grounding instead of D3 (default: d3)
  configs/paper.py:cds,base          SFT baseline without the thought token (default: latent)
  configs/paper.py:cds,tpu-v5e-8     a mesh preset (tpu-v4-8, tpu-v5e-8, tpu-v5p-16,
                                     gpu-h100x8); default: every device on one FSDP axis

Memory per device (GiB), worst-case bucket (prompt 512 + thought + target 64), bfloat16
compute with remat, float32 weights / AdamW / grads, the same for every dataset; from
latentr3_jax.parallel.memory.estimate_memory (regenerate: python configs/paper.py):

| preset | mesh d,f,t | step | rows/dev | params | opt state | grads | activations | total | HBM |
|---|---|---|---|---|---|---|---|---|---|
| tpu-v4-8 | 1,4,1 | sft | 32 | 1.4 | 2.9 | 1.4 | 10.2 | 16.0 | 32 |
| tpu-v4-8 | 1,4,1 | grpo | 64 | 1.4 | 0.0 | 0.0 | 9.7 | 11.2 | 32 |
| tpu-v5e-8 | 1,8,1 | sft | 16 | 0.7 | 1.4 | 0.7 | 5.1 | 8.0 | 16 |
| tpu-v5e-8 | 1,8,1 | grpo | 32 | 0.7 | 0.0 | 0.0 | 4.9 | 5.6 | 16 |
| tpu-v5p-16 | 2,4,1 | sft | 16 | 1.4 | 2.9 | 1.4 | 5.1 | 10.9 | 95 |
| tpu-v5p-16 | 2,4,1 | grpo | 32 | 1.4 | 0.0 | 0.0 | 4.9 | 6.3 | 95 |
| gpu-h100x8 | 1,8,1 | sft | 16 | 0.7 | 1.4 | 0.7 | 5.1 | 8.0 | 80 |
| gpu-h100x8 | 1,8,1 | grpo | 32 | 0.7 | 0.0 | 0.0 | 4.9 | 5.6 | 80 |

(end of memory table)
"""

from __future__ import annotations

from latentr3_jax.config import base_config
from latentr3_jax.errors import InputError

HF_PATH_PLACEHOLDER = "/path/to/Qwen2.5-1.5B"
DATA_ROOT_PLACEHOLDER = "/path/to/amazon18"

# short name -> (D3 folder name, category word of the prompt; SPEC.md section 3: the
# release's words for its four, a readable lower-case name for the others)
DATASETS = {
    "cds": ("CDs_and_Vinyl", "musics"),
    "toys": ("Toys_and_Games", "toys and games"),
    "games": ("Video_Games", "video games"),
    "instruments": ("Musical_Instruments", "music instruments"),
    "industrial": ("Industrial_and_Scientific", "industrial and scientific"),
    "office": ("Office_Products", "office products"),
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

# what each word of the argument chooses, and the choices
VARIANTS = {
    "dataset": tuple(DATASETS),
    "recipe": ("d3", "bigrec"),
    "thoughts": ("latent", "base"),
    "mesh": tuple(MESH_PRESETS),
}


def parse_variant(arg) -> dict:
    """'cds,bigrec,base,tpu-v4-8' -> {'dataset': 'cds', 'recipe': 'bigrec',
    'thoughts': 'base', 'mesh': 'tpu-v4-8'}; the dataset is required."""
    out = {"dataset": "", "recipe": "d3", "thoughts": "latent", "mesh": ""}
    given = {}
    for word in [w.strip() for w in str(arg or "").split(",") if w.strip()]:
        group = next((g for g, names in VARIANTS.items() if word in names), None)
        if group is None:
            known = "; ".join(f"{g}: {', '.join(names)}" for g, names in VARIANTS.items())
            raise InputError(f"unknown config variant {word!r} (known: {known})")
        if group in given:
            raise InputError(f"config variant names two {group} choices: {given[group]} and {word}")
        given[group] = out[group] = word
    if not out["dataset"]:
        raise InputError(f"configs/paper.py needs a dataset after a colon, e.g. "
                         f"configs/paper.py:cds; datasets: {', '.join(DATASETS)}")
    return out


def get_config(arg=None):
    """Qwen2.5-1.5B on one Amazon category with the release's hyperparameters."""
    v = parse_variant(arg)
    folder, category = DATASETS[v["dataset"]]
    c = base_config()
    c.workdir = f"runs/qwen2.5-1.5b_{v['dataset']}_{v['recipe']}_{v['thoughts']}"  # gs:// works too

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
    c.model.num_thoughts = 1 if v["thoughts"] == "latent" else 0
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
    c.grpo.select = "last"          # the release keeps the final step's latent

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
        p = MESH_PRESETS[v["mesh"]]
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = p["data"], p["fsdp"], p["tensor"]
    return c


# --------------------------------------------------------------------------- memory table

TABLE_BEGIN = "latentr3_jax.parallel.memory.estimate_memory (regenerate: python configs/paper.py):"
TABLE_END = "(end of memory table)"


def memory_table() -> str:
    """The per-preset memory table of this file's docstring (the dataset changes nothing)."""
    from latentr3_jax.parallel import memory
    model = memory.qwen25_1_5b()
    rows = ["| preset | mesh d,f,t | step | rows/dev | params | opt state | grads | activations "
            "| total | HBM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in MESH_PRESETS.items():
        est = memory.config_estimates(get_config(f"cds,{name}"), p["devices"], decoder_config=model)
        mesh = ",".join(str(s) for s in est["mesh"])
        for step in ("sft", "grpo"):
            e = est[step]
            vals = [e[k] / memory.GIB for k in ("params_bytes", "opt_state_bytes", "grads_bytes",
                                                 "activations_bytes", "total_bytes")]
            rows.append(f"| {name} | {mesh} | {step} | {est['rows'][step]} | "
                        + " | ".join(f"{x:.1f}" for x in vals) + f" | {p['hbm_gib']} |")
    return "\n".join(rows)


def rewrite_docstring(path: str) -> bool:
    """Refresh the memory table in the docstring of `path` (this file); True if it changed."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    i = text.index(TABLE_BEGIN) + len(TABLE_BEGIN)
    j = text.index(TABLE_END)
    new = text[:i] + "\n\n" + memory_table() + "\n\n" + text[j:]
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return new != text


if __name__ == "__main__":
    import os
    here = os.path.abspath(__file__)
    print(("updated " if rewrite_docstring(here) else "already current: ") + here)
