"""The one configuration: its defaults, its command line and its validation.

`base_config()` holds every key with its default; each file in configs/ starts from it and
overrides. `parse_config(argv)` reads `--config FILE[:ARG] --config.a.b=value ...` into a
locked ConfigDict. `validate(cfg, stage)` checks every key's type and range and the
constraints between keys, so a bad setting stops at the edge with one line naming the key.
Checks that need the data, the devices, the environment or a run directory stay where
those are read. `DOCS` says in one line what each key does (`latentr3 <command> --help`
lists them with their values).

The allowed values of the choice keys live here, at the bottom of the layers, so the
modules that act on them (data, train, eval) import them from here. This module imports
no JAX: `latentr3 --help` and a bad command line answer at once.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
from typing import Callable, Optional, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from latentr3_jax.errors import InputError, one_line

# The model package imports JAX on import, which the command line defers, so its three sets
# are repeated here; tests/test_config_validate.py holds them equal to
# model.config.ARCHITECTURES, model.latent.LATENT_MODES and model.latent.LATENT_INITS.
MODEL_TYPES = ("qwen2", "llama")
LATENT_MODES = ("ratt", "hidden")               # LatentRATT | raw hidden state (ablation)
LATENT_INITS = ("normal", "identity")           # LatentRATT's first weights
DATASETS = ("synthetic", "d3", "tfds")
LATENT_COMBINES = ("logmeanexp", "max")          # decode.beam.LATENT_COMBINES
TEMPLATES = ("latentr3", "bigrec")              # D3 template | BIGRec (Alpaca) template
TOKENIZER_SPLITS = ("qwen", "gpt2")             # trained BPE pre-tokeniser
BPE_MIN_VOCAB = 260                             # 256 bytes + <|endoftext|> + <|Thought|> + merges
DTYPES = ("float32", "bfloat16")
SCAN_LAYERS = ("auto", "true", "false")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")   # = model.config.ATTENTION_IMPLS (no jax import here)
ADVANTAGES = ("batch", "group", "grpo", "rloo", "group_mean")   # LR-GRPO baselines
ESTIMATORS = ("ppo", "reinforce", "pathwise")   # LR-GRPO gradient estimator
GRPO_REWARDS = ("perplexity", "contrastive")    # LR-GRPO reward of a noisy sample
NEGATIVE_SOURCES = ("batch", "model")           # where the contrastive negatives come from
GRPO_SELECT = ("best", "last")   # which LR-GRPO checkpoint is the run's model
SELECT_METRICS = ("reward", "ndcg")   # what grpo.select=best compares on valid
SIGMA_SCHEDULES = ("linear", "cosine")          # LR-GRPO noise decay (grpo.sigma_final)
EVAL_MODES = ("constrained", "bigrec")          # trie beam search | BIGRec grounding
SPLITS = ("train", "valid", "test")
STAGES = ("sft", "grpo", "run", "study", "evaluate")
# data/synthetic.py: 8 genres of 2 to 280 titles each
SYNTHETIC_ITEMS = (16, 2240)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"

    # ---- data (SPEC.md sections 2-3)
    c.dataset = "synthetic"        # synthetic | d3 | tfds
    c.dataset_dir = ""             # D3-format folder (dataset=d3) or TFDS data_dir (dataset=tfds)
    c.data = ml_collections.ConfigDict()
    c.data.category = ""           # '' = derived from the folder name
    c.data.template = "latentr3"   # latentr3 (D3 template) | bigrec (Alpaca template)
    c.data.cutoff = 512            # prompt tokens kept (left truncation)
    c.data.buckets = (64, 128, 256, 512)   # prompt-length buckets (static shapes)
    c.data.max_target_len = 32
    c.data.target_buckets = (16, 32)       # target-length buckets (static shapes)
    c.data.tfds_name = ""          # dataset=tfds: which dataset under dataset_dir ('' = the only one)
    c.data.skip_invalid = False
    c.data.max_train_rows = -1     # -1 = all
    c.data.max_eval_rows = -1
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_items = 320
    c.data.synthetic.num_users = 700   # ~3.1k train / 387 valid / 388 test rows
    c.data.synthetic.seed = 0

    # ---- tokenizer: a local HF directory, or trained in-process (byte-level BPE)
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""          # '' = the model's hf_path, else train one
    c.tokenizer.vocab_size = 8000          # at most; a small corpus gives fewer
    c.tokenizer.split = "qwen"             # trained BPE pre-tokeniser: qwen | gpt2
    c.tokenizer.min_frequency = 2

    # ---- model (SPEC.md section 4)
    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""           # local HF checkpoint dir; '' = from scratch with the shape below
    c.model.model_type = "qwen2"
    c.model.hidden_size = 256
    c.model.intermediate_size = 1024
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.rope_theta = 1000000.0
    c.model.tie_word_embeddings = True
    c.model.num_thoughts = 1       # 0 = plain BIGRec/D3 SFT baseline
    c.model.latent_mode = "ratt"   # ratt | hidden (ablation: raw hidden state as latent)
    c.model.latent_init = "normal"  # LatentRATT's first weights: normal (release) | identity
    c.model.latent_factors = 1     # K > 1: K LatentRATT heads write K thought slots (N = 1)
    c.model.dtype = "float32"      # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = False          # recompute each layer's activations in the backward pass
    # auto: run the layers under lax.scan when there are more than 8 (one layer compiled;
    # deep models, TPUs), unrolled otherwise (faster for shallow models: no stacked
    # residual copies) and on a CPU (faster there at any depth, both dtypes); or true / false
    c.model.scan_layers = "auto"
    # attention: einsum (ours, every backend) | xla | cudnn (jax.nn.dot_product_attention;
    # cudnn: cuDNN's fused kernel, NVIDIA GPUs with bf16 / fp16 compute)
    c.model.attention_impl = "einsum"

    # ---- device mesh (-1 = all remaining devices)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # ---- multi-host (jax.distributed); empty = single process or auto-detected on TPU
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    # ---- stage 1: SFT (SPEC.md section 5)
    c.sft = ml_collections.ConfigDict()
    c.sft.init_from = ""            # run directory whose best weights start this run ('' = model.*)
    c.sft.learning_rate = 3e-4
    c.sft.warmup_steps = 20
    c.sft.latent_lr_scale = 1.0     # LatentRATT's learning rate = this x sft.learning_rate
    c.sft.latent_diversity = 0.1    # K > 1: weight of the factors' mean squared cosine
    c.sft.slot_bottleneck = 0.0     # share of rows trained with the prompt hidden from the title
    c.sft.batch_size = 128          # global batch (sequences)
    c.sft.micro_batch_size = 0      # 0 = no gradient accumulation
    c.sft.epochs = 3
    c.sft.max_steps = -1
    c.sft.patience = 1
    c.sft.weight_decay = 0.0
    c.sft.grad_clip = 1.0
    c.sft.log_every = 10
    c.sft.checkpoint_every = 200
    c.sft.keep_checkpoints = 2
    c.sft.max_bad_steps = 10        # consecutive non-finite steps before stopping
    c.sft.eval_batch_size = 0       # validation batch; 0 = the micro-batch size

    # ---- stage 2: LR-GRPO (SPEC.md section 6)
    c.grpo = ml_collections.ConfigDict()
    c.grpo.init_from = ""           # SFT run directory
    c.grpo.group_size = 8
    c.grpo.sigma = 1.5
    c.grpo.sigma_final = -1.0       # sigma at the last batch; -1 = sigma throughout
    c.grpo.sigma_schedule = "linear"   # linear | cosine decay from sigma to sigma_final
    c.grpo.learning_rate = 5e-5
    c.grpo.warmup_steps = 200
    c.grpo.prompts_per_batch = 32   # global batch = prompts_per_batch * group_size sequences
    c.grpo.micro_batch_size = 0     # prompts per micro-batch; 0 = no accumulation
    c.grpo.epochs = 1
    c.grpo.max_steps = -1
    c.grpo.advantage = "batch"      # batch (release) | group | grpo | rloo | group_mean
    c.grpo.estimator = "ppo"        # ppo (release: token log-prob ratio) | reinforce (Gaussian score) | pathwise
    c.grpo.clip_low = 0.2
    c.grpo.clip_high = 0.28
    c.grpo.iterations = 1           # PPO iterations (mu) per batch
    c.grpo.kl_beta = 0.0
    c.grpo.latent_trust = 0.0       # weight of ||r - r_sft||^2 in the loss; 0 = none
    c.grpo.reward = "perplexity"    # perplexity (release) | contrastive (own title vs others)
    c.grpo.negatives = 3            # contrastive: other titles scored per sample
    c.grpo.negative_source = "batch"   # contrastive: batch (other users') | model (SFT top titles)
    c.grpo.remine_every = 0         # negative_source=model: mine the train negatives again
                                    # from the current latent every K batches; 0 = once
    c.grpo.diagnose_every = 0       # batches between pathwise-gradient cosines; 0 = never
    c.grpo.weight_decay = 0.0       # AdamW decay of the trained weights
    c.grpo.train_llm = False
    c.grpo.grad_clip = 1.0
    c.grpo.log_every = 10
    c.grpo.checkpoint_every = 200
    c.grpo.keep_checkpoints = 2
    c.grpo.max_bad_steps = 10
    c.grpo.evaluate = True          # HR/NDCG on the valid split after training
    c.grpo.eval_every = 0           # batches between valid rewards; 0 = at epoch ends only
    c.grpo.select = "best"          # best (highest valid value, the SFT start included) | last
    c.grpo.select_metric = "reward"  # reward (noise-free valid reward) | ndcg (valid NDCG@10
                                    # of the beam search, eval settings)
    c.grpo.select_users = 512       # select_metric=ndcg: the first this many valid users; -1 all

    # ---- `latentr3 run` (the whole recipe)
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.base_epochs = 0      # >0: a shared N=0 SFT stage of this many epochs that both
                                    # SFT variants start from (sft.init_from); 0 = none

    # ---- `latentr3 study` (the variants of `run` over several seeds)
    c.study = ml_collections.ConfigDict()
    c.study.seeds = (0, 1, 2)       # one `run` per seed under <workdir>/seed_<s>
    c.study.bootstrap = 2000        # resamples of the users for the paired intervals
    c.study.sasrec = True           # train SASRec on the same split as a reference row
    c.study.report_only = False     # no training or decoding: tables from the predictions there

    # ---- evaluation (SPEC.md section 7)
    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""          # run directory to evaluate
    c.eval.split = "test"
    c.eval.mode = "constrained"     # constrained (D3 trie beam search) | bigrec (grounding)
    c.eval.num_beams = 10
    c.eval.length_penalty = 1.0
    c.eval.batch_size = 16
    c.eval.max_users = -1
    c.eval.ks = (1, 3, 5, 10, 20)
    c.eval.output_dir = ""          # '' = <checkpoint>/eval_<split>_<mode> (or <workdir>/...)
    c.eval.data_from_run = True     # dataset/data settings from the run's config.json
    c.eval.grounding_beams = 4      # bigrec: beams of the free generation
    c.eval.max_new_tokens = 32      # bigrec: longest generated title (tokens, EOS included)
    c.eval.latent_samples = 1       # test-time latent ensemble: M latents per user; 1 = off
    c.eval.latent_sigma = 0.5       # its noise: latents 2..M are r + latent_sigma * N(0, I)
    c.eval.latent_combine = "logmeanexp"  # a title's score over the M: logmeanexp | max
    c.eval.resume = True            # continue from an existing predictions.jsonl
    c.eval.progress = True          # tqdm progress bar
    return c


# --------------------------------------------------------------------------- validation
# Each rule takes a value and returns what is wrong with it ('' when nothing), phrased to
# follow "config <key> ", e.g. "must be >= 1".

Rule = Callable[[object], str]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _integer(lo: int, hi: Optional[int] = None, *, or_: Optional[int] = None) -> Rule:
    """An int in [lo, hi]; `or_` is one more allowed value below lo (-1 = all, no limit)."""
    def rule(v):
        if not _is_int(v):
            return "must be an integer"
        if v < lo and v != or_:
            return f"must be {or_} or >= {lo}" if or_ is not None else f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return ""
    return rule


def _number(*, gt: Optional[float] = None, ge: Optional[float] = None,
            lt: Optional[float] = None, or_: Optional[float] = None) -> Rule:
    """A finite number in the bounds; `or_` is one more allowed value (-1 = off)."""
    def rule(v):
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
            return "must be a finite number"
        if or_ is not None and v == or_:
            return ""
        if gt is not None and not v > gt:
            return f"must be {or_:g} or > {gt:g}" if or_ is not None else f"must be > {gt:g}"
        if ge is not None and not v >= ge:
            return f"must be {or_:g} or >= {ge:g}" if or_ is not None else f"must be >= {ge:g}"
        if lt is not None and not v < lt:
            return f"must be < {lt:g}"
        return ""
    return rule


def _choice(options: Sequence[str]) -> Rule:
    return lambda v: "" if isinstance(v, str) and v in options \
        else f"must be one of {', '.join(options)}"


def _boolean(v) -> str:
    return "" if isinstance(v, bool) else "must be true or false"


def _string(v) -> str:
    return "" if isinstance(v, str) else "must be a string"


def _nonempty_string(v) -> str:
    return _string(v) or ("" if v.strip() else "must not be empty")


def _scan_layers(v) -> str:
    ok = isinstance(v, bool) or (isinstance(v, str) and v.strip().lower() in SCAN_LAYERS)
    return "" if ok else "must be auto, true or false"


def _int_tuple(*, lo: int = 1, increasing: bool = False, empty_ok: bool = False) -> Rule:
    def rule(v):
        if not isinstance(v, (tuple, list)) or not all(_is_int(x) for x in v):
            return "must be a tuple of integers, such as (16, 32)"
        if not v and not empty_ok:
            return "must not be empty"
        if any(x < lo for x in v):
            return f"must hold only values >= {lo}"
        if increasing and any(a >= b for a, b in zip(v, v[1:])):
            return "must be strictly increasing"
        return ""
    return rule


_MESH_AXIS = _integer(1, or_=-1)
_STEPS_LIMIT = _integer(1, or_=-1)     # -1 = no limit
_ROWS_LIMIT = _integer(0, or_=-1)      # -1 = all

RULES = {
    "seed": _integer(0),
    "workdir": _nonempty_string,
    "dataset": _choice(DATASETS),
    "dataset_dir": _string,
    "data.category": _string,
    "data.template": _choice(TEMPLATES),
    "data.cutoff": _integer(1),
    "data.buckets": _int_tuple(increasing=True),
    "data.max_target_len": _integer(1),
    "data.target_buckets": _int_tuple(increasing=True, empty_ok=True),  # () = (max_target_len,)
    "data.tfds_name": _string,
    "data.skip_invalid": _boolean,
    "data.max_train_rows": _ROWS_LIMIT,
    "data.max_eval_rows": _ROWS_LIMIT,
    "data.synthetic.num_items": _integer(*SYNTHETIC_ITEMS),
    "data.synthetic.num_users": _integer(1),
    "data.synthetic.seed": _integer(0),
    "tokenizer.path": _string,
    "tokenizer.vocab_size": _integer(BPE_MIN_VOCAB),
    "tokenizer.split": _choice(TOKENIZER_SPLITS),
    "tokenizer.min_frequency": _integer(0),
    "model.hf_path": _string,
    "model.model_type": _choice(MODEL_TYPES),
    "model.hidden_size": _integer(1),
    "model.intermediate_size": _integer(1),
    "model.num_layers": _integer(1),
    "model.num_heads": _integer(1),
    "model.num_kv_heads": _integer(1),
    "model.rope_theta": _number(gt=0),
    "model.tie_word_embeddings": _boolean,
    "model.num_thoughts": _integer(0),
    "model.latent_mode": _choice(LATENT_MODES),
    "model.latent_init": _choice(LATENT_INITS),
    "model.latent_factors": _integer(1),
    "model.dtype": _choice(DTYPES),
    "model.remat": _boolean,
    "model.scan_layers": _scan_layers,
    "model.attention_impl": _choice(ATTENTION_IMPLS),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "distributed.coordinator_address": _string,
    "distributed.num_processes": _integer(0),
    "distributed.process_id": _integer(0, or_=-1),
    "sft.init_from": _string,
    "sft.learning_rate": _number(gt=0),
    "sft.warmup_steps": _integer(0),
    "sft.latent_lr_scale": _number(gt=0),
    "sft.latent_diversity": _number(ge=0),
    "sft.slot_bottleneck": _number(ge=0, lt=1),
    "sft.batch_size": _integer(1),
    "sft.micro_batch_size": _integer(0),
    "sft.epochs": _integer(0),
    "sft.max_steps": _STEPS_LIMIT,
    "sft.patience": _integer(1),
    "sft.weight_decay": _number(ge=0),
    "sft.grad_clip": _number(ge=0),
    "sft.log_every": _integer(1),
    "sft.checkpoint_every": _integer(1),
    "sft.keep_checkpoints": _integer(1),
    "sft.max_bad_steps": _integer(1),
    "sft.eval_batch_size": _integer(0),
    "grpo.init_from": _string,
    "grpo.group_size": _integer(2),         # sample 1 of each group is noise-free
    "grpo.sigma": _number(gt=0),
    "grpo.sigma_final": _number(gt=0, or_=-1),
    "grpo.sigma_schedule": _choice(SIGMA_SCHEDULES),
    "grpo.learning_rate": _number(gt=0),
    "grpo.warmup_steps": _integer(0),
    "grpo.prompts_per_batch": _integer(1),
    "grpo.micro_batch_size": _integer(0),
    "grpo.epochs": _integer(0),
    "grpo.max_steps": _STEPS_LIMIT,
    "grpo.advantage": _choice(ADVANTAGES),
    "grpo.estimator": _choice(ESTIMATORS),
    "grpo.clip_low": _number(ge=0, lt=1),
    "grpo.clip_high": _number(ge=0),
    "grpo.iterations": _integer(1),
    "grpo.kl_beta": _number(ge=0),
    "grpo.latent_trust": _number(ge=0),
    "grpo.reward": _choice(GRPO_REWARDS),
    "grpo.negatives": _integer(1),
    "grpo.negative_source": _choice(NEGATIVE_SOURCES),
    "grpo.remine_every": _integer(0),
    "grpo.diagnose_every": _integer(0),
    "grpo.weight_decay": _number(ge=0),
    "grpo.train_llm": _boolean,
    "grpo.grad_clip": _number(ge=0),
    "grpo.log_every": _integer(1),
    "grpo.checkpoint_every": _integer(1),
    "grpo.keep_checkpoints": _integer(1),
    "grpo.max_bad_steps": _integer(1),
    "grpo.evaluate": _boolean,
    "grpo.eval_every": _integer(0),
    "grpo.select": _choice(GRPO_SELECT),
    "grpo.select_metric": _choice(SELECT_METRICS),
    "grpo.select_users": _integer(1, or_=-1),
    "pipeline.base_epochs": _integer(0),
    "study.seeds": _int_tuple(lo=0),
    "study.bootstrap": _integer(100),
    "study.sasrec": _boolean,
    "study.report_only": _boolean,
    "eval.checkpoint": _string,
    "eval.split": _choice(SPLITS),
    "eval.mode": _choice(EVAL_MODES),
    "eval.num_beams": _integer(1),
    "eval.length_penalty": _number(),
    "eval.batch_size": _integer(1),
    "eval.max_users": _ROWS_LIMIT,
    "eval.ks": _int_tuple(),
    "eval.output_dir": _string,
    "eval.data_from_run": _boolean,
    "eval.grounding_beams": _integer(1),
    "eval.max_new_tokens": _integer(1),
    "eval.latent_samples": _integer(1),
    "eval.latent_sigma": _number(ge=0),
    "eval.latent_combine": _choice(LATENT_COMBINES),
    "eval.resume": _boolean,
    "eval.progress": _boolean,
}

# --------------------------------------------------------------------------- key meanings
# One line per key for `latentr3 <command> --help`, in base_config() order;
# tests/test_config_validate.py holds its keys equal to base_config()'s.

SECTION_DOCS = {
    "": "seed, run directory and dataset",
    "data": "the dataset rows, prompts and batch shapes",
    "tokenizer": "a Hugging Face tokenizer, or a byte-level BPE trained on the data",
    "model": "the decoder (its shape applies only when built from scratch) and the latent",
    "mesh": "device mesh axis sizes",
    "distributed": "multi-process runs (jax.distributed)",
    "sft": "stage 1, supervised fine-tuning",
    "grpo": "stage 2, LR-GRPO on the latent",
    "pipeline": "`latentr3 run`",
    "study": "`latentr3 study`",
    "eval": "ranking the catalog for each user",
}

DOCS = {
    "seed": "random seed of weight init, batch order and LR-GRPO noise",
    "workdir": "run directory (config, checkpoints, metrics); run/study put variants below it",
    "dataset": "synthetic (generated) | d3 (a D3-format folder) | tfds",
    "dataset_dir": "D3 folder | TFDS data_dir; for synthetic, '' = <workdir>/synthetic_data",
    "data.category": "word(s) naming the category in the prompt; '' = from the dataset's name",
    "data.template": "prompt template: latentr3 (D3) | bigrec (Alpaca)",
    "data.cutoff": "prompt tokens kept; longer prompts lose their oldest tokens",
    "data.buckets": "prompt-length buckets (static shapes); longer prompts keep their last tokens",
    "data.max_target_len": "target tokens kept, EOS included; longer titles are cut",
    "data.target_buckets": "target-length buckets (static shapes); () = (max_target_len,)",
    "data.tfds_name": "dataset=tfds: which dataset under dataset_dir; '' = the only one",
    "data.skip_invalid": "skip and count malformed rows instead of stopping at the first",
    "data.max_train_rows": "keep the first N train rows; -1 = all",
    "data.max_eval_rows": "keep the first N valid and test rows; -1 = all",
    "data.synthetic.num_items": "synthetic: catalog size (16 to 2240)",
    "data.synthetic.num_users": "synthetic: users (700 give ~3.1k train, 387 valid, 388 test rows)",
    "data.synthetic.seed": "synthetic: seed of the generated data",
    "tokenizer.path": "local Hugging Face tokenizer directory; '' = model.hf_path's, else a BPE",
    "tokenizer.vocab_size": "trained BPE: largest vocabulary (a small corpus gives fewer)",
    "tokenizer.split": "trained BPE: pre-tokeniser qwen | gpt2",
    "tokenizer.min_frequency": "trained BPE: fewest occurrences of a pair it merges",
    "model.hf_path": "local Hugging Face checkpoint directory (or .gguf); '' = from scratch",
    "model.model_type": "from scratch: qwen2 (attention biases) | llama",
    "model.hidden_size": "from scratch: width of the residual stream",
    "model.intermediate_size": "from scratch: width of the MLP",
    "model.num_layers": "from scratch: decoder layers",
    "model.num_heads": "from scratch: attention (query) heads",
    "model.num_kv_heads": "from scratch: key/value heads (grouped-query attention)",
    "model.rope_theta": "from scratch: RoPE base frequency",
    "model.tie_word_embeddings": "from scratch: the output layer reuses the embedding table",
    "model.num_thoughts": "latent thought tokens before the answer; 0 = plain SFT baseline",
    "model.latent_mode": "ratt (LatentRATT) | hidden (raw last hidden state, an ablation)",
    "model.latent_init": "new LatentRATT weights: normal (N(0, 0.02), the release's) | identity "
                         "(V = identity: the latent starts as an attention-weighted mean of "
                         "the prompt's last hidden states)",
    "model.latent_factors": "factorised latents: K LatentRATT heads write K thought slots in "
                            "parallel from the prompt (needs num_thoughts = 1, latent_mode ratt); "
                            "1 = the paper's single latent",
    "model.dtype": "compute dtype float32 | bfloat16 (params stay float32)",
    "model.remat": "recompute each layer's activations in the backward pass (less memory)",
    "model.scan_layers": "run the layers under lax.scan: auto (9 or more layers, except "
                         "on a CPU) | true | false",
    "model.attention_impl": "einsum (ours) | xla | cudnn (jax.nn.dot_product_attention; cudnn: "
                            "NVIDIA GPUs, bf16 / fp16)",
    "mesh.data": "data-parallel axis size; -1 = the remaining devices",
    "mesh.fsdp": "fully sharded (params and batch) axis size; -1 = the remaining devices",
    "mesh.tensor": "tensor-parallel axis size; -1 = the remaining devices",
    "distributed.coordinator_address": "HOST:PORT of process 0; '' = $JAX_COORDINATOR_ADDRESS",
    "distributed.num_processes": "processes in the run; 0 = $JAX_NUM_PROCESSES or detected",
    "distributed.process_id": "this process's index; -1 = $JAX_PROCESS_ID or detected",
    "sft.init_from": "run directory whose best weights and tokenizer start this run; '' = model.*",
    "sft.learning_rate": "peak AdamW learning rate (linear warmup, then linear decay to 0)",
    "sft.warmup_steps": "optimizer steps of linear warmup",
    "sft.latent_lr_scale": "LatentRATT's learning rate relative to sft.learning_rate (1 = the "
                           "release's single rate)",
    "sft.latent_diversity": "with latent_factors > 1: weight of the factors' mean squared "
                            "cosine (0 = orthogonal, 1 = parallel) added to the token-mean loss",
    "sft.slot_bottleneck": "with thoughts: the share of each batch's rows (drawn per step) whose "
                           "thought slot(s) and target cannot attend to the prompt, so the title "
                           "is predicted from the latent alone (an ablation; 0 = off, the "
                           "release)",
    "sft.batch_size": "global batch in sequences (over all devices and micro-batches)",
    "sft.micro_batch_size": "sequences per gradient-accumulation micro-batch; 0 = whole batch",
    "sft.epochs": "passes over the train split; 0 = max_steps alone sets the length",
    "sft.max_steps": "stop after this many steps; -1 = no limit",
    "sft.patience": "validations (one per epoch) without a lower valid loss before stopping",
    "sft.weight_decay": "AdamW weight decay",
    "sft.grad_clip": "clip the gradient to this global norm; 0 = no clipping",
    "sft.log_every": "steps between metric writes and progress updates",
    "sft.checkpoint_every": "steps between checkpoints (also saved at each epoch's end)",
    "sft.keep_checkpoints": "latest checkpoints kept (the best one is kept besides)",
    "sft.max_bad_steps": "consecutive non-finite (skipped) steps before stopping with exit 1",
    "sft.eval_batch_size": "validation batch; 0 = the micro-batch size",
    "grpo.init_from": "SFT run directory (with latent thoughts): model, tokenizer, best weights",
    "grpo.group_size": "samples per prompt: one noise-free latent and group_size - 1 noisy ones",
    "grpo.sigma": "standard deviation of the Gaussian noise added to the latent",
    "grpo.learning_rate": "peak AdamW learning rate (linear warmup, then cosine decay to 0)",
    "grpo.warmup_steps": "batches of linear warmup",
    "grpo.prompts_per_batch": "prompts per batch; the batch is prompts_per_batch * group_size rows",
    "grpo.micro_batch_size": "prompts per gradient-accumulation micro-batch; 0 = whole batch",
    "grpo.epochs": "passes over the train split; 0 = max_steps alone sets the length",
    "grpo.max_steps": "stop after this many batches; -1 = no limit",
    "grpo.sigma_final": "noise standard deviation reached at the last batch; -1 = grpo.sigma "
                        "throughout",
    "grpo.sigma_schedule": "decay of the noise from grpo.sigma to sigma_final: linear | cosine",
    "grpo.advantage": "batch (the release's: mean eps=0 reward of the batch as baseline, L2 "
                      "norm over the batch) | group (the group's eps=0 reward, L2 norm) | grpo "
                      "(group mean/std) | rloo (leave-one-out mean of the other noisy samples, "
                      "raw reward units) | group_mean (group mean, L2 norm)",
    "grpo.estimator": "ppo (the release's: PPO-clip of the target tokens' log-prob ratio) | "
                      "reinforce (Gaussian score eps/sigma^2 of the latent) | pathwise "
                      "(gradient of the mean reward through the noisy latents)",
    "grpo.clip_low": "PPO ratio clip below: 1 - clip_low (ppo, reinforce)",
    "grpo.clip_high": "PPO ratio clip above: 1 + clip_high (ppo, reinforce)",
    "grpo.iterations": "PPO updates (mu) on each sampled batch",
    "grpo.kl_beta": "weight of the k3 KL penalty to the starting model (ppo); 0 = none",
    "grpo.latent_trust": "weight of ||r - r_sft||^2 (latent of the current vs the starting "
                         "weights, same prompt) per unit of the objective; 0 = none",
    "grpo.reward": "a noisy sample's reward: perplexity (the release's: minus the perplexity "
                   "of the user's title) | contrastive (log-probability that the user's title "
                   "wins a softmax over itself and grpo.negatives other users' titles of the "
                   "batch, each scored by its mean token log-likelihood under the same latent)",
    "grpo.negatives": "contrastive reward: other titles scored per sample (each costs one "
                      "more title pass per sample)",
    "grpo.negative_source": "contrastive reward, where the negatives come from: batch (other "
                            "prompts' titles of the same (micro-)batch) | model (the SFT model's "
                            "own top titles for the prompt, mined once by beam search over the "
                            "train and valid splits before the first step)",
    "grpo.remine_every": "negative_source=model: mine the train split's negatives again from "
                         "the current latent after every K batches (one beam search over the "
                         "train split each time); 0 = mined once from the SFT model",
    "grpo.diagnose_every": "batches between cosines of the update with the pathwise reward "
                           "gradient (one more forward and backward pass then); 0 = never",
    "grpo.weight_decay": "AdamW weight decay of the trained weights",
    "grpo.train_llm": "train the LLM's weights too, not only LatentRATT",
    "grpo.grad_clip": "clip the gradient to this global norm; 0 = no clipping",
    "grpo.log_every": "batches between metric writes and progress updates",
    "grpo.checkpoint_every": "batches between checkpoints (also saved at each epoch's end)",
    "grpo.keep_checkpoints": "latest checkpoints kept",
    "grpo.max_bad_steps": "consecutive non-finite (skipped) steps before stopping with exit 1",
    "grpo.evaluate": "`latentr3 grpo`: HR/NDCG on the valid split after training",
    "grpo.eval_every": "batches between noise-free valid rewards (also at the start and at "
                       "each epoch's end); 0 = start and epoch ends only",
    "grpo.select": "the run's model: best (the checkpoint with the highest valid value, "
                   "grpo.select_metric, the SFT starting point included, so a stage that lowers "
                   "it returns the SFT latent) | last (the final step's, as the release keeps)",
    "grpo.select_metric": "the valid value of each evaluation (start, every grpo.eval_every "
                          "batches, epoch ends) that select=best compares: reward (the "
                          "noise-free valid reward) | ndcg (NDCG@10, title rule, of the "
                          "evaluator's search with the eval settings over the first "
                          "grpo.select_users valid users; the reward is still logged)",
    "grpo.select_users": "select_metric=ndcg: valid users whose NDCG@10 is compared (the "
                         "first this many of the split; -1 = all)",
    "pipeline.base_epochs": "epochs of a shared N=0 SFT stage the variants start from; 0 = none",
    "study.seeds": "one `run` per seed, under <workdir>/seed_<s>",
    "study.bootstrap": "resamples of the users for the paired 95% intervals",
    "study.sasrec": "train SASRec on the same split as a reference row",
    "study.report_only": "train and decode nothing: build the tables from the variants' "
                         "predictions already under <workdir>/seed_<s> (e.g. runs copied back "
                         "from an accelerator without their checkpoints)",
    "eval.checkpoint": "`latentr3 evaluate`: run directory whose best checkpoint is evaluated",
    "eval.split": "split to evaluate: train | valid | test",
    "eval.mode": "constrained (trie beam search over the catalog) | bigrec (generate, then ground)",
    "eval.num_beams": "constrained: beams, which is also the length of the ranked list",
    "eval.length_penalty": "constrained: beam score = log-prob sum / length ** length_penalty",
    "eval.batch_size": "users per batch (a multiple of mesh.data * mesh.fsdp)",
    "eval.max_users": "evaluate the first N rows of the split; -1 = all",
    "eval.ks": "cut-offs K of HR@K and NDCG@K",
    "eval.output_dir": "where predictions and metrics go; '' = <run>/eval_<split>_<mode>",
    "eval.data_from_run": "take dataset, dataset_dir and data.* from the evaluated run's config",
    "eval.grounding_beams": "bigrec: beams of the free generation",
    "eval.max_new_tokens": "bigrec: longest generated title in tokens, EOS included",
    "eval.latent_samples": "constrained mode, a model with thoughts: M latents per user (its own "
                           "and M - 1 noisy ones) searched side by side, scores merged per title",
    "eval.latent_sigma": "noise of the extra latents of eval.latent_samples (choose on valid)",
    "eval.latent_combine": "a title's score over the M searches: logmeanexp (a search that missed "
                           "it adds 0 to the mean) | max",
    "eval.resume": "continue from an existing predictions.jsonl",
    "eval.progress": "show a progress bar",
}


def flat_items(cfg, prefix: str = "") -> dict:
    """{'a.b': value} for every leaf of a (nested) ConfigDict or dict."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def validate(cfg, stage: Optional[str] = None) -> None:
    """Check every key of `cfg` (type, range, allowed values) and the constraints between
    keys; raise InputError with one line naming the key at the first problem.

    `stage` adds what one command needs: 'grpo' an SFT run (grpo.init_from), 'evaluate' a
    run to evaluate (eval.checkpoint), 'run' a latent thought and no sft.init_from beside a
    base stage; 'sft' and None add nothing. Reads no files and no devices.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"validate: stage must be one of {STAGES} or None, got {stage!r}")
    values = flat_items(cfg)
    for key in values:
        if key not in RULES:
            raise InputError(f"config has no key {key!r}{_suggestion(key, RULES)}")
    for key, rule in RULES.items():
        if key not in values:
            raise InputError(f"config is missing key {key!r} (configs start from base_config())")
        problem = rule(values[key])
        if problem:
            raise InputError(f"config {key} {problem}, got {values[key]!r}")
    _check_relations(cfg)
    if stage is not None:
        _check_stage(cfg, stage)


def _check_relations(cfg) -> None:
    if cfg.dataset in ("d3", "tfds") and not cfg.dataset_dir.strip():
        what = "a D3 folder" if cfg.dataset == "d3" else "a TFDS data_dir"
        raise InputError(f"config dataset_dir must be set for dataset={cfg.dataset} "
                         f"(--config.dataset_dir=<{what}>)")
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise InputError(f"config model.hidden_size must be a multiple of model.num_heads "
                         f"{m.num_heads}, got {m.hidden_size}")
    if m.num_heads % m.num_kv_heads:
        raise InputError(f"config model.num_heads must be a multiple of model.num_kv_heads "
                         f"{m.num_kv_heads}, got {m.num_heads}")
    if int(m.latent_factors) > 1 and (m.num_thoughts > 1 or m.latent_mode != "ratt"):
        raise InputError(f"config model.latent_factors={m.latent_factors} needs "
                         f"model.num_thoughts <= 1 and model.latent_mode=ratt (the factors are "
                         f"parallel LatentRATT heads), got num_thoughts={m.num_thoughts}, "
                         f"latent_mode={m.latent_mode}")
    if float(cfg.sft.get("slot_bottleneck", 0.0)) > 0 and not m.num_thoughts:
        raise InputError(f"config sft.slot_bottleneck={cfg.sft.slot_bottleneck} needs "
                         f"model.num_thoughts >= 1 (it routes the prompt through the latent)")
    if cfg.sft.init_from and m.hf_path:
        raise InputError("config sft.init_from and model.hf_path are both set: the weights come "
                         "from one or the other (the run named by init_from records its own "
                         "source)")
    free = [f"mesh.{a}" for a in ("data", "fsdp", "tensor") if cfg.mesh[a] == -1]
    if len(free) > 1:
        raise InputError(f"config {' and '.join(free)} are each -1: at most one mesh axis takes "
                         f"the remaining devices")
    d = cfg.distributed
    if d.coordinator_address and not re.fullmatch(r"\S+:\d+", d.coordinator_address):
        raise InputError(f"config distributed.coordinator_address must be HOST:PORT, "
                         f"got {d.coordinator_address!r}")
    if d.num_processes > 0 and d.process_id >= d.num_processes:
        raise InputError(f"config distributed.process_id must be < distributed.num_processes "
                         f"{d.num_processes}, got {d.process_id}")
    for name, batch_key in (("sft", "batch_size"), ("grpo", "prompts_per_batch")):
        sec = cfg[name]
        micro, batch = sec.micro_batch_size, sec[batch_key]
        if micro and batch % micro:
            raise InputError(f"config {name}.micro_batch_size must divide {name}.{batch_key} "
                             f"{batch} (0 = no accumulation), got {micro}")
        if sec.epochs <= 0 and sec.max_steps <= 0:
            raise InputError(f"config {name}.epochs or {name}.max_steps must be positive, got "
                             f"{sec.epochs} and {sec.max_steps}")
    g = cfg.grpo
    if g.reward == "contrastive" and g.negative_source == "batch":
        prompts = g.micro_batch_size or g.prompts_per_batch
        if g.negatives >= prompts:
            raise InputError(f"config grpo.negatives must be below the prompts of a "
                             f"(micro-)batch {prompts} (the negatives are the other prompts' "
                             f"titles), got {g.negatives}")
    if cfg.grpo.advantage == "rloo" and cfg.grpo.group_size < 3:
        raise InputError(f"config grpo.group_size must be >= 3 for grpo.advantage=rloo (each "
                         f"noisy sample's baseline is the mean of the other noisy ones), got "
                         f"{cfg.grpo.group_size}")


def _check_stage(cfg, stage: str) -> None:
    if stage == "grpo" and not cfg.grpo.init_from:
        raise InputError("config grpo.init_from must be set for grpo: the SFT run directory "
                         "(--config.grpo.init_from=DIR)")
    if stage == "evaluate" and not cfg.eval.checkpoint:
        raise InputError("config eval.checkpoint must be set for evaluate: the run directory "
                         "(--config.eval.checkpoint=DIR)")
    if stage in ("run", "study"):
        if cfg.model.num_thoughts < 1:
            raise InputError(f"config model.num_thoughts must be >= 1 for run (its LatentR³ "
                             f"variants; the baseline runs with 0), got {cfg.model.num_thoughts}")
        if cfg.pipeline.base_epochs > 0 and cfg.sft.init_from:
            raise InputError("config pipeline.base_epochs and sft.init_from are both set: the "
                             "base stage is where the variants start from")


# --------------------------------------------------------------------------- command line

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)


def default_config_file(name: str = "default.py") -> str:
    return os.path.join(_REPO_CONFIGS, name)


def parse_config(argv: Sequence[str], default_file: Optional[str] = None,
                 extra_flags=None) -> tuple:
    """Parse `argv` (without the program name) into (locked ConfigDict, FlagValues).

    `--config FILE[:ARG]` names the config file (default: `default_file`, else
    configs/default.py); `--config.a.b=value` overrides one key. `extra_flags(fv)` may
    define more absl flags on the same FlagValues. An unknown key, a value of the wrong
    type or a config file that fails to load raise InputError with one line. The values
    are not checked here: call `validate(cfg, stage)` next.
    """
    argv = ["latentr3"] + list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = argv[:1] + ["--config", default_file or default_config_file()] + argv[1:]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=argv,
                                    lock_config=True, help_string="config file (configs/*.py)")
    if extra_flags is not None:
        extra_flags(fv)
    try:
        fv(argv)
        cfg = fv.config
        if cfg is not None:
            cfg.to_dict()  # a config file that failed to load raises on first access
    except Exception as e:  # absl, config file import and override errors alike
        raise InputError(_explain(e, argv)) from None
    if cfg is None:
        raise InputError(f"config file {_config_spec(argv)}: get_config() returned nothing")
    return cfg, fv


def _config_spec(argv: Sequence[str]) -> Optional[str]:
    """The value of --config (FILE or FILE:ARG)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _explain(err: Exception, argv: Sequence[str]) -> str:
    """One line for a failed parse: load the config file alone to tell a bad file from an
    unknown key from a value of the wrong type."""
    spec = _config_spec(argv)
    if spec is None:
        return f"bad command line: {one_line(err)}"
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"config file {path} not found"
    try:
        loaded = _load_config_file(spec)
    except Exception as e:
        return f"config file {spec}: {one_line(e)}"
    if loaded is None:
        return f"config file {spec}: get_config() returned nothing"
    keys = flat_items(loaded)
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if m and not _has_key(loaded, m.group(1)):
            return f"config has no key {m.group(1)!r}{_suggestion(m.group(1), keys)}"
    m = re.match(r"flag --config\.([^=\s]+)=(.*?): ", str(err), re.DOTALL)
    if m and _has_key(loaded, m.group(1)):
        key, default = m.group(1), _get(loaded, m.group(1))
        if isinstance(default, ml_collections.ConfigDict):
            return f"config {key} is a section: set its keys, as --config.{key}.NAME=VALUE"
        return f"config {key} must be {_type_words(default)}, got {m.group(2)!r}"
    return f"bad command line or config: {one_line(err)}"


def _load_config_file(spec: str):
    """get_config(ARG) of FILE for spec FILE[:ARG], as config_flags calls it (errors as raised)."""
    path, *arg = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("latentr3_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*arg)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _has_key(cfg, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(cfg, (ml_collections.ConfigDict, dict)) or part not in cfg:
            return False
        cfg = cfg[part]
    return True


def _suggestion(key: str, keys) -> str:
    """'; did you mean a.b?': the keys of the same last name, else the closest spelling."""
    keys = sorted(keys)
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key][:3] \
        or difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _type_words(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if _is_int(value):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, tuple):
        return "a tuple, such as (16, 32)"
    return f"a {type(value).__name__}"
