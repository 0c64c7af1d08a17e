"""Qwen2.5-1.5B on Amazon Musical_Instruments (category word "music instruments"), the release's recipe.

Stage 1 SFT: AdamW 3e-4, 20 warmup steps then linear decay, global batch 128, <= 3 epochs
with early stopping (patience 1), bfloat16, prompt cutoff 512. Stage 2 LR-GRPO: G = 8,
sigma 1.5, 32 prompts x 8, cosine schedule with 200 warmup steps, lr 5e-5, clip 0.2 / 0.28,
beta 0, one epoch. Evaluation: constrained beam search, 10 beams, length penalty 1.0.

Point it at your files:
  latentr3 run --config configs/paper_instruments.py \\
      --config.model.hf_path=/models/Qwen2.5-1.5B \\
      --config.dataset_dir=/data/amazon18/Musical_Instruments --config.workdir=gs://bucket/runs/instruments

Variants after a colon, comma-separated (see configs/presets.py):
  configs/paper_instruments.py:bigrec          BIGRec template + grounding instead of D3
  configs/paper_instruments.py:base            SFT baseline without the thought token
  configs/paper_instruments.py:tpu-v5e-8       a mesh preset (tpu-v4-8, tpu-v5e-8, tpu-v5p-16,
                                          gpu-h100x8); default: every device on one FSDP axis

Memory per device (GiB), worst-case bucket (prompt 512 + thought + target 64), bfloat16
compute with remat, float32 weights / AdamW / grads; from
latentr3_jax.parallel.memory.estimate_memory (regenerate: python configs/presets.py):

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

import importlib.util
import os


def _presets():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets.py")
    spec = importlib.util.spec_from_file_location("latentr3_config_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    return _presets().paper_config("instruments", arg)
