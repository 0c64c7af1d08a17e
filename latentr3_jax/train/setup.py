"""Building the model a run trains: from a local Hugging Face checkpoint, from an earlier
run's weights (`sft.init_from`) or from scratch."""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from latentr3_jax import data, hf
from latentr3_jax.errors import InputError
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import ATTENTION_IMPLS, DecoderConfig
from latentr3_jax.train import checkpoint as ckpt_lib
from latentr3_jax.train import runs
from latentr3_jax.train.fingerprint import tokenizer_fingerprint


def wants_latent_params(cfg) -> bool:
    return int(cfg.model.num_thoughts) > 0 and cfg.model.latent_mode == "ratt"


def load_init_run(cfg, tokenizer=None):
    """The RunArtifacts of cfg.sft.init_from (its best checkpoint), checked against
    `tokenizer` when one is given."""
    path = cfg.sft.init_from
    base = runs.load_run(path, which=ckpt_lib.BEST)
    if tokenizer is not None:
        got = tokenizer_fingerprint(tokenizer)
        want = tokenizer_fingerprint(base.tokenizer)
        if got != want:
            raise InputError(f"config sft.init_from {path}: that run's tokenizer differs from this "
                             f"run's ({_first_diff(want, got)}); leave tokenizer.path empty to use "
                             f"the init run's tokenizer")
    return base


def _first_diff(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b), key=lambda k: (k != "vocab_size", k)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k)!r} there vs {b.get(k)!r} here"
    return "no difference"


def compute_dtype(cfg):
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def scratch_config(cfg, tokenizer) -> DecoderConfig:
    m = cfg.model
    try:
        return DecoderConfig(
            vocab_size=int(tokenizer.vocab_size), hidden_size=int(m.hidden_size),
            intermediate_size=int(m.intermediate_size), num_layers=int(m.num_layers),
            num_heads=int(m.num_heads), num_kv_heads=int(m.num_kv_heads),
            rope_theta=float(m.rope_theta), attention_bias=m.model_type == "qwen2",
            tie_word_embeddings=bool(m.tie_word_embeddings), model_type=str(m.model_type),
            eos_token_id=int(tokenizer.eos_id), pad_token_id=int(tokenizer.pad_id))
    except ValueError as e:
        raise InputError(f"config model: {e}") from None


def _fit_vocab(config: DecoderConfig, params: dict, tokenizer) -> Tuple[DecoderConfig, dict]:
    """Make the embedding table end exactly at the tokenizer's <|Thought|> id.

    Rows past the tokenizer's base vocabulary (HF checkpoints often pad the table) are
    never produced by the tokenizer and are dropped; then one row is added for the thought
    token unless the checkpoint already has it.
    """
    want = int(tokenizer.vocab_size)
    if config.vocab_size == want:
        return config, params
    base = want - 1  # the tokenizer's vocabulary without <|Thought|>
    if config.vocab_size > base:
        params = dict(params)
        params["embed"] = {"embedding": params["embed"]["embedding"][:base]}
        if "lm_head" in params:
            params["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :base]}
        config = config.replace(vocab_size=base)
    return hf.resize_vocab(config, params, want - config.vocab_size)


def build_model(cfg, tokenizer, rng: jax.Array) -> Tuple[DecoderConfig, dict]:
    """(DecoderConfig, params) for a run, incl. params['latent'] when it trains LatentRATT.

    With sft.init_from, the decoder weights (and the shape) are that run's best checkpoint;
    its LatentRATT weights carry over when it has them in the same latent mode, otherwise
    the module starts fresh (N = 0 run -> LatentR³ run).
    """
    dec_rng, lat_rng = jax.random.split(rng)
    carried_latent = None
    if cfg.model.hf_path:
        config, params = hf.load_pretrained(cfg.model.hf_path)
        config, params = _fit_vocab(config, params, tokenizer)
        if tokenizer.eos_id is not None and config.eos_token_id is None:
            config = config.replace(eos_token_id=int(tokenizer.eos_id))
    elif cfg.sft.init_from:
        base = load_init_run(cfg, tokenizer)
        config = base.model_config
        params = {k: v for k, v in base.params.items() if k != "latent"}
        if ("latent" in base.params and base.latent_mode == cfg.model.latent_mode
                and latent.num_factors(base.params) == latent_factors(cfg)):
            carried_latent = base.params["latent"]   # continuing a LatentR³ run
    else:
        config = scratch_config(cfg, tokenizer)
        params = decoder.init_params(config, dec_rng)
    params = dict(params)
    if wants_latent_params(cfg):
        params["latent"] = carried_latent if carried_latent is not None else \
            latent.init_latent_params(config, lat_rng, init=latent_init(cfg),
                                      factors=latent_factors(cfg))
    return execution_config(cfg, config), params


def latent_init(cfg) -> str:
    """cfg.model.latent_init ('normal' for configs written before the option existed)."""
    return str(cfg.model.get("latent_init", "normal"))


def latent_factors(cfg) -> int:
    """cfg.model.latent_factors (1 for configs written before the option existed)."""
    return int(cfg.model.get("latent_factors", 1))


SCAN_AUTO_MIN_LAYERS = 9


def scan_layers_option(value, num_layers: int, *, backend: Optional[str] = None) -> bool:
    """cfg.model.scan_layers ('auto', 'true', 'false' or a bool) for a model's depth and
    backend (default: JAX's default backend).

    auto scans models of SCAN_AUTO_MIN_LAYERS layers or more (one compiled layer: shorter
    compiles on TPUs and GPUs), except on a CPU: there the 30-layer SmolLM2 plain step ran
    faster unrolled in every round of bench/scan_ab.py in both dtypes (float32 12.9-16.9 s
    against 13.5-19.2 s scanned, bfloat16 8.2-13.6 s against 14.3-20.9 s;
    bench/results/scan_ab_smollm2-135m.json), so it unrolls.
    """
    v = str(value).strip().lower()
    if v == "auto":
        if num_layers < SCAN_AUTO_MIN_LAYERS:
            return False
        if (backend or jax.default_backend()) == "cpu":
            return False
        return True
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise InputError(f"config model.scan_layers must be auto, true or false, got {value!r}")


def execution_config(cfg, config: DecoderConfig) -> DecoderConfig:
    """`config` with the run's execution options (cfg.model.scan_layers / remat /
    attention_impl)."""
    impl = str(cfg.model.get("attention_impl", "einsum"))
    if impl not in ATTENTION_IMPLS:
        raise InputError(f"config model.attention_impl must be one of "
                         f"{', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    return config.with_execution(
        scan_layers=scan_layers_option(cfg.model.scan_layers, config.num_layers),
        remat=bool(cfg.model.remat), attention_impl=impl)


def params_axes(config: DecoderConfig, params: dict) -> dict:
    """Logical axes for `params` (decoder weights plus the latent module if present)."""
    axes = decoder.param_axes(config)
    if "latent" in params:
        axes["latent"] = latent.latent_param_axes(latent.num_factors(params))
    return axes


def init_fn(cfg, config: DecoderConfig):
    """rng -> params with the same tree as build_model's from-scratch params (for
    creating params directly sharded)."""
    with_latent = wants_latent_params(cfg)

    def init(rng):
        dec_rng, lat_rng = jax.random.split(rng)
        params = dict(decoder.init_params(config, dec_rng))
        if with_latent:
            params["latent"] = latent.init_latent_params(config, lat_rng, init=latent_init(cfg),
                                                         factors=latent_factors(cfg))
        return params
    return init


def encode_split(cfg, tok, dataset, split: str) -> list:
    """One split of `dataset` as token ids, with the config's template and cutoffs."""
    return data.encode_split(tok, dataset.splits.get(split, []), dataset.category_word,
                             cfg.data.template, cfg.data.cutoff,
                             max_target_len=cfg.data.max_target_len)


def target_buckets(cfg) -> tuple:
    """Target-length buckets (static shapes); one bucket of max_target_len when unset."""
    tb = tuple(int(b) for b in cfg.data.target_buckets or ())
    return tb or (int(cfg.data.max_target_len),)
