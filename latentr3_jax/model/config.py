"""Decoder configuration for the Qwen2 / Llama families."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


EXECUTION_FIELDS = ("scan_layers", "remat", "attention_impl")
# How attention is computed: einsum (our head-major einsums, every backend), xla or cudnn
# (`jax.nn.dot_product_attention` with that implementation; cudnn needs an NVIDIA GPU and
# bf16 / fp16 compute).
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static shape and behaviour of the decoder; hashable so it can be a jit static arg."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs, hashable
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # q/k/v biases (Qwen2: True)
    tie_word_embeddings: bool = False
    model_type: str = "qwen2"
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    # Latent reasoning module (LatentRATT), SPEC.md section 4.
    latent_rope_theta: float = 1000.0
    # How the layers run, not what they compute (not saved with the weights, see
    # EXECUTION_FIELDS): `scan_layers` runs the stacked layers under `lax.scan` (one layer
    # compiled, the choice for deep models and TPUs); False unrolls them in Python, which
    # avoids the scan's stacked-residual copies and is faster for shallow models on CPU.
    # `remat` recomputes each layer's activations in the backward pass. `attention_impl`:
    # see ATTENTION_IMPLS.
    scan_layers: bool = True
    remat: bool = False
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; known: "
                             f"{', '.join(ATTENTION_IMPLS)}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"unknown model_type {self.model_type!r}; known: {sorted(ARCHITECTURES)}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw: Any) -> "DecoderConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """The architecture (what checkpoints and fingerprints record), without
        EXECUTION_FIELDS."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        for k in EXECUTION_FIELDS:
            d.pop(k)
        return d

    def with_execution(self, *, scan_layers: Optional[bool] = None,
                       remat: Optional[bool] = None,
                       attention_impl: Optional[str] = None) -> "DecoderConfig":
        """Same architecture, other execution options (None keeps the current one)."""
        kw = {k: bool(v) for k, v in (("scan_layers", scan_layers), ("remat", remat)) if v is not None}
        if attention_impl is not None:
            kw["attention_impl"] = str(attention_impl)
        return dataclasses.replace(self, **kw) if kw else self

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields: {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d


def tiny_config(**overrides: Any) -> DecoderConfig:
    """A small Qwen2-style decoder for tests and CPU demos."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, rope_theta=10000.0, attention_bias=True,
                tie_word_embeddings=True, model_type="qwen2", rms_norm_eps=1e-6)
    base.update(overrides)
    return DecoderConfig(**base)


def bench_config(vocab_size: int = 8001, **overrides: Any) -> DecoderConfig:
    """SPEC.md section 9 benchmark decoder: hidden 256, MLP 1024, 4 layers, 4/2 heads, tied."""
    base = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_layers=4,
                num_heads=4, num_kv_heads=2, rope_theta=1000000.0, attention_bias=True,
                tie_word_embeddings=True, model_type="qwen2", rms_norm_eps=1e-6)
    base.update(overrides)
    return DecoderConfig(**base)
