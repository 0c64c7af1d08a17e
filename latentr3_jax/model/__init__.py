"""Decoder (Qwen2 / Llama) and the LatentR³ latent reasoning module."""

from latentr3_jax.model.config import DecoderConfig, bench_config, tiny_config
from latentr3_jax.model.decoder import (apply, cache_axes, embed_tokens, init_cache, init_params,
                                        lm_head, logits, param_axes, param_shapes, repeat_cache)
from latentr3_jax.model.latent import (init_latent_params, init_model_params, latent_forward,
                                       latent_param_axes, latent_param_shapes, latent_ratt,
                                       model_param_axes, prefill_and_latents, reference_forward,
                                       suffix_logits, target_cross_entropy, target_logprobs)

__all__ = [
    "DecoderConfig", "bench_config", "tiny_config", "apply", "cache_axes", "embed_tokens",
    "init_cache", "init_params", "lm_head", "logits", "param_axes", "param_shapes",
    "repeat_cache", "init_latent_params", "init_model_params", "latent_forward",
    "latent_param_axes", "latent_param_shapes", "latent_ratt", "model_param_axes",
    "prefill_and_latents", "reference_forward", "suffix_logits", "target_cross_entropy",
    "target_logprobs",
]
