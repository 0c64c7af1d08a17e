"""Data layer: D3-format datasets, raw Amazon preprocessing, prompts, tokenizers, batches.

`load_dataset(cfg)` is the one entry point the trainers use; it reads
cfg.dataset = synthetic (generated into cfg.dataset_dir or <workdir>/synthetic_data),
d3 (a folder, cfg.dataset_dir) or tfds (a tfds data_dir, cfg.dataset_dir).
"""

from __future__ import annotations

from latentr3_jax.data.batches import BatchIterator
from latentr3_jax.data.d3 import (Catalog, Dataset, ReadReport, Sample, category_word, read_d3,
                                  write_d3)
from latentr3_jax.data.prompts import (Encoded, build_prompt, catalog_target_ids,
                                       check_target_tokenisation, encode_sample, encode_split,
                                       format_target, title_from_target)
from latentr3_jax.data.synthetic import synthetic_dir, write_synthetic
from latentr3_jax.data.tfds_builder import read_tfds
from latentr3_jax.data.tokenizer import (THOUGHT_TOKEN, Tokenizer, load_tokenizer,
                                         make_tokenizer, tokenizer_corpus, train_tokenizer)
from latentr3_jax.config import DATASETS
from latentr3_jax.errors import InputError


def load_dataset(cfg) -> Dataset:
    """The dataset named by cfg.dataset; cfg.data.max_train_rows / max_eval_rows (>= 0)
    keep only the first rows of train / valid and test."""
    kind = cfg.dataset
    data = cfg.data
    if kind == "synthetic":
        syn = data.synthetic
        folder = write_synthetic(synthetic_dir(cfg), num_items=syn.num_items,
                                 num_users=syn.num_users, seed=syn.seed)
        ds = read_d3(folder, category=data.category)
    elif kind == "d3":
        if not cfg.dataset_dir:
            raise InputError("dataset=d3 needs --config.dataset_dir=<D3 folder>")
        ds = read_d3(cfg.dataset_dir, skip_invalid=data.skip_invalid, category=data.category)
    elif kind == "tfds":
        if not cfg.dataset_dir:
            raise InputError("dataset=tfds needs --config.dataset_dir=<tfds data_dir>")
        ds = read_tfds(cfg.dataset_dir, name=data.tfds_name)
        if data.category:
            ds.category_word = data.category
    else:
        raise InputError(f"dataset={kind!r}: expected one of {', '.join(DATASETS)}")
    if data.max_train_rows >= 0:
        ds.splits["train"] = ds.splits["train"][:data.max_train_rows]
    if data.max_eval_rows >= 0:
        for split in ("valid", "test"):
            ds.splits[split] = ds.splits[split][:data.max_eval_rows]
    return ds


__all__ = [
    "BatchIterator", "Catalog", "DATASETS", "Dataset", "Encoded", "ReadReport", "Sample",
    "THOUGHT_TOKEN", "Tokenizer", "build_prompt", "catalog_target_ids", "category_word",
    "check_target_tokenisation", "encode_sample", "encode_split", "format_target",
    "load_dataset", "load_tokenizer", "make_tokenizer", "read_d3", "title_from_target", "tokenizer_corpus",
    "train_tokenizer", "write_d3",
]
