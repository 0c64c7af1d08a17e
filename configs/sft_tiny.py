"""A tiny from-scratch model on a small synthetic dataset: CPU tests and demos in seconds."""

from latentr3_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/sft_tiny"
    c.dataset = "synthetic"
    c.data.synthetic.num_items = 60
    c.data.synthetic.num_users = 120
    c.data.cutoff = 48             # short prompts: one bucket, one compiled shape
    c.data.buckets = (48,)
    c.data.target_buckets = (32,)
    c.data.max_train_rows = 64
    c.data.max_eval_rows = 16
    c.tokenizer.vocab_size = 400
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.sft.batch_size = 8
    c.sft.learning_rate = 1e-3
    c.sft.warmup_steps = 2
    c.sft.epochs = 1
    c.sft.log_every = 2
    c.sft.checkpoint_every = 4
    return c
