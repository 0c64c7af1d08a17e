"""The demo: a small decoder trained from scratch on the embedded synthetic dataset.

`latentr3 run --config configs/demo.py` trains a shared N=0 base stage (3 epochs), then
the N=0 baseline and LatentR³ (N=1) each for 3 more epochs from that base, then LR-GRPO;
it evaluates each with trie-constrained beam search and prints one table; it is sized to
finish in under 10 minutes on 2 CPU cores. The synthetic data (320 albums, about 3.1k
train / 390 test rows; structure and baseline numbers in latentr3_jax/data/synthetic.py)
gives 4-token targets and prompts of 74-109 tokens, hence the tight buckets.

The base stage stands in for the pretrained LLM that every variant of the paper
fine-tunes. Started from random weights instead (`--config.pipeline.base_epochs=0
--config.sft.epochs=5`), the LatentR³ run decides early, and by chance, whether its
thought slot is ever read: some seeds stay at predicting popularity (README, "The demo").
Point it at real data with
`--config.dataset=d3 --config.dataset_dir=../shared/data/amazon18/CDs_and_Vinyl`, or at a
local Hugging Face checkpoint with `--config.model.hf_path=DIR` (then
`--config.pipeline.base_epochs=0`: the checkpoint is the base).
"""

from latentr3_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/demo"
    c.dataset = "synthetic"
    # synthetic rows use only the first bucket pairs; the larger ones are for real data
    c.data.buckets = (88, 112, 256, 512)
    c.data.target_buckets = (6, 16, 32)
    c.tokenizer.vocab_size = 2000

    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2

    c.sft.batch_size = 32
    c.sft.learning_rate = 3e-3
    c.sft.warmup_steps = 20
    c.sft.epochs = 3
    c.sft.patience = 1
    c.sft.log_every = 10

    c.pipeline.base_epochs = 3     # shared N=0 stage the two SFT variants continue from

    c.grpo.group_size = 8
    c.grpo.prompts_per_batch = 16
    c.grpo.learning_rate = 1e-4
    c.grpo.warmup_steps = 10
    c.grpo.epochs = 1
    c.grpo.max_steps = 60
    c.grpo.evaluate = False       # the pipeline evaluates every variant on test

    c.eval.batch_size = 32
    c.eval.num_beams = 10
    return c
