"""SmolLM2-135M-Instruct (a real pretrained Llama-family LLM) on a real Amazon folder.

The dataset goes after a colon, then variants, comma-separated:
  latentr3 study --config configs/smollm2.py:cds --config.workdir=runs/smollm2_cds
  latentr3 run   --config configs/smollm2.py:industrial,cpu --config.workdir=runs/s_ind_cpu

Datasets (folders of ../shared/data/amazon18 beside the repository; override with
--config.dataset_dir):
  cds          CDs_and_Vinyl               5,841 items, 10.7k train / 6.2k valid / 6.2k test rows
  industrial   Industrial_and_Scientific   3,686 items, 10.4k train / 4.5k valid / 4.5k test
  office       Office_Products             3,459 items,  9.5k train / 4.9k valid / 4.9k test

The model is the GGUF file ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf, read directly
(`model.hf_path` accepts a .gguf: it is converted once into a Hugging Face folder beside it,
tokenizer included). The checkpoint is the base: no base stage (pipeline.base_epochs = 0).

The recipe is the release's (SPEC.md sections 5-7) adapted to a 135M model:
  SFT     AdamW, 20 warmup steps then linear decay, global batch 128 (micro-batches of 16),
          <= 3 epochs with early stopping on valid loss (patience 1); lr 3e-4 (the
          release's for 1.5B; a 135M model tolerates it);
  LR-GRPO G = 8, sigma 1.5, 32 prompts per batch, cosine schedule, lr 5e-5, clip 0.2/0.28,
          one epoch, the release's objective; the noise-free valid reward every 50
          batches, and the run keeps the best checkpoint, the SFT start included
          (grpo.select=best: on CDs the release's objective wrecked the latent, see README);
  eval    trie-constrained beam search, 10 beams;
  dtype   bfloat16 compute (float32 weights) on accelerators; float32 with the `cpu`
          variant.

Variants:
  cpu     fits one seed of one dataset in about an hour on 2 CPU cores: 1,024 train rows
          (the first in file order), the first 300 valid and 300 test rows, 1 SFT epoch at
          batch 32 (3 warmup steps), 20 LR-GRPO batches of 8 prompts, 5 beams, float32. The numbers it
          gives are for checking the pipeline on a laptop, not for comparing with the paper.
  gpu     one large accelerator (an H100/H200, 80 GB or more): the same recipe in larger
          pieces (two 64-row micro-batches per 128-row SFT batch, whole 32-prompt LR-GRPO
          batches), two prompt buckets and one target bucket so that each step compiles
          for at most two shapes, and 128-user evaluation batches. Same global batches and
          schedules as the default, so the same experiment in fewer, larger kernels.
  bigrec  BIGRec template + L2 grounding instead of D3.
"""

import os

from latentr3_jax.config import base_config

_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
MODEL = os.path.normpath(os.path.join(_SHARED, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
DATASETS = {"cds": "CDs_and_Vinyl", "industrial": "Industrial_and_Scientific",
            "office": "Office_Products"}
VARIANTS = ("cpu", "gpu", "bigrec")


def parse_variant(arg) -> tuple:
    """'industrial,cpu' -> ('industrial', {'cpu'}); no argument = cds."""
    tokens = [t.strip() for t in str(arg or "cds").split(",") if t.strip()]
    datasets = [t for t in tokens if t in DATASETS]
    unknown = [t for t in tokens if t not in DATASETS and t not in VARIANTS]
    if unknown or len(datasets) != 1:
        raise ValueError(f"configs/smollm2.py:<dataset>[,cpu|,gpu][,bigrec]: one dataset of "
                         f"{sorted(DATASETS)} and variants of {list(VARIANTS)}; got {arg!r}")
    return datasets[0], {t for t in tokens if t in VARIANTS}


def get_config(arg=None):
    dataset, variants = parse_variant(arg)
    c = base_config()
    c.workdir = f"runs/smollm2_{dataset}"
    c.dataset = "d3"
    c.dataset_dir = os.path.normpath(os.path.join(_SHARED, "data", "amazon18", DATASETS[dataset]))
    c.model.hf_path = MODEL
    c.model.dtype = "bfloat16"
    c.data.cutoff = 512
    c.data.buckets = (128, 192, 256, 384, 512)
    c.data.target_buckets = (16, 32)

    c.sft.learning_rate = 3e-4
    c.sft.warmup_steps = 20
    c.sft.batch_size = 128
    c.sft.micro_batch_size = 16
    c.sft.epochs = 3
    c.sft.patience = 1
    c.sft.eval_batch_size = 32
    c.sft.log_every = 5
    c.pipeline.base_epochs = 0

    c.grpo.group_size = 8
    c.grpo.sigma = 1.5
    c.grpo.prompts_per_batch = 32
    c.grpo.micro_batch_size = 8
    c.grpo.learning_rate = 5e-5
    c.grpo.warmup_steps = 20
    c.grpo.epochs = 1
    c.grpo.evaluate = False        # the pipeline evaluates every variant on eval.split
    c.grpo.eval_every = 50         # valid reward every 50 batches; the best one is kept

    c.eval.num_beams = 10
    c.eval.batch_size = 16
    if "bigrec" in variants:
        c.data.template = "bigrec"
        c.eval.mode = "bigrec"
    if "cpu" in variants and "gpu" in variants:
        raise ValueError("configs/smollm2.py: the cpu and gpu variants exclude each other")
    if "gpu" in variants:
        c.data.buckets = (256, 512)
        c.data.target_buckets = (32,)
        c.sft.micro_batch_size = 64
        c.sft.eval_batch_size = 128
        c.grpo.micro_batch_size = 0
        c.eval.batch_size = 128
    if "cpu" in variants:
        c.workdir += "_cpu"
        c.model.dtype = "float32"
        c.data.max_train_rows = 1024
        c.data.max_eval_rows = 300
        c.data.buckets = (192, 256, 384, 512)
        c.sft.epochs = 1
        c.sft.batch_size = 32           # 32 optimizer steps over the 1,024 rows
        c.sft.warmup_steps = 3
        c.sft.micro_batch_size = 8
        c.sft.eval_batch_size = 16
        c.sft.log_every = 1
        c.grpo.prompts_per_batch = 8
        c.grpo.micro_batch_size = 0
        c.grpo.max_steps = 20
        c.grpo.eval_every = 0
        c.grpo.warmup_steps = 2
        c.grpo.log_every = 1
        c.eval.num_beams = 5
        c.eval.batch_size = 8
    return c
