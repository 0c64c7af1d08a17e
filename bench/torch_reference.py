"""PyTorch / transformers reference of the release's computations (for benchmarks).

- `LatentRATT`: the latent module of SPEC.md section 4 in torch.
- `build_qwen2(config)`: a transformers Qwen2ForCausalLM of a DecoderConfig's shape, and
  `load_jax_params` / `load_jax_latent` to give it / LatentRATT the weights of a JAX
  params tree.
- `release_sft_step`: the release's SFT step: a full pass over [prompt, <|Thought|>,
  target] for the hidden states, LatentRATT, a second full pass with the latent in the
  thought slot, cross-entropy on the target tokens, backward through both, AdamW.
- `plain_step`: one ordinary fwd + bwd + AdamW pass over [prompt, target].
- `train_step_fn`: either step, ready to time.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM


class LatentRATT(nn.Module):
    """Single-head attention over the prompt's last hidden states; the query is the slot
    before the thought. Q/K/V d x d with bias, RoPE base 1000 over all d dims (rotate-half),
    scale 1/sqrt(d), no output projection."""

    def __init__(self, d: int, rope_theta: float = 1000.0, std: float = 0.02):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        for lin in (self.q, self.k, self.v):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        inv = 1.0 / (rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.d = d

    def _rope(self, x, pos):
        f = pos.float()[..., None] * self.inv_freq
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def forward(self, hidden, mask, positions):
        """hidden [B, S, d] up to the thought slot; returns r [B, d]."""
        q = self._rope(self.q(hidden[:, -1:]), positions[:, -1:])
        k = self._rope(self.k(hidden), positions)
        v = self.v(hidden)
        scores = (q @ k.transpose(1, 2)).float() / math.sqrt(self.d)
        scores = scores.masked_fill(~mask[:, None, :].bool(), -1e30)
        probs = scores.softmax(-1).to(v.dtype)
        return (probs @ v)[:, 0]


def qwen2_config(config):
    return Qwen2Config(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size,
                       num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                       num_key_value_heads=config.num_kv_heads, rope_theta=config.rope_theta,
                       rms_norm_eps=config.rms_norm_eps,
                       tie_word_embeddings=config.tie_word_embeddings,
                       max_position_embeddings=config.max_position_embeddings,
                       use_sliding_window=False)


def build_qwen2(config, dtype=torch.float32, attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(config))
    model.config._attn_implementation = attn_implementation
    return model.to(dtype)


@torch.no_grad()
def load_jax_params(model, config, params) -> None:
    """Copy a JAX params tree (decoder layout) into the torch model."""
    t = lambda x: torch.from_numpy(np.asarray(x, np.float32).copy())
    m = model.model
    m.embed_tokens.weight.copy_(t(params["embed"]["embedding"]))
    L = params["layers"]
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        d = config.hidden_size
        for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
            w = np.asarray(L["attn"][name]["kernel"][i])          # [d, H, hd]
            lin.weight.copy_(t(w.reshape(d, -1).T))
            if "bias" in L["attn"][name]:
                lin.bias.copy_(t(np.asarray(L["attn"][name]["bias"][i]).reshape(-1)))
        a.o_proj.weight.copy_(t(np.asarray(L["attn"]["o"]["kernel"][i]).reshape(-1, d).T))
        layer.input_layernorm.weight.copy_(t(L["input_norm"]["scale"][i]))
        layer.post_attention_layernorm.weight.copy_(t(L["post_attn_norm"]["scale"][i]))
        layer.mlp.gate_proj.weight.copy_(t(np.asarray(L["mlp"]["gate"]["kernel"][i]).T))
        layer.mlp.up_proj.weight.copy_(t(np.asarray(L["mlp"]["up"]["kernel"][i]).T))
        layer.mlp.down_proj.weight.copy_(t(np.asarray(L["mlp"]["down"]["kernel"][i]).T))
    m.norm.weight.copy_(t(params["final_norm"]["scale"]))
    if "lm_head" in params:
        model.lm_head.weight.copy_(t(np.asarray(params["lm_head"]["kernel"]).T))


@torch.no_grad()
def load_jax_latent(ratt: LatentRATT, latent_params: dict) -> None:
    """Copy a JAX LatentRATT params tree (`params["latent"]`) into `ratt`."""
    for name in ("q", "k", "v"):
        lin = getattr(ratt, name)
        lin.weight.copy_(torch.from_numpy(np.asarray(latent_params[name]["kernel"]).T.copy()))
        lin.bias.copy_(torch.from_numpy(np.asarray(latent_params[name]["bias"]).copy()))


def train_step_fn(kind: str, model, batches, thought_id: int, autocast_dtype=None):
    """i -> the loss of one training step on batches[i]: kind 'latent' (`release_sft_step`,
    with a fresh LatentRATT on the model's device) or 'plain' (`plain_step`)."""
    if kind == "latent":
        ratt = LatentRATT(model.config.hidden_size).to(model.device)
        opt = make_optimizer([model, ratt])
        return lambda i: release_sft_step(model, ratt, opt, batches[i], thought_id, autocast_dtype)
    opt = make_optimizer([model])
    return lambda i: plain_step(model, opt, batches[i], autocast_dtype)


def make_optimizer(modules, lr: float = 3e-4):
    ps = [p for m in modules for p in m.parameters()]
    return torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def to_torch(batch: dict, device=None) -> dict:
    return {k: torch.from_numpy(np.asarray(v)).to(device or "cpu")
            for k, v in batch.items() if k != "row"}


def _autocast(batch, dtype):
    """Mixed precision on the batch's device (cpu or cuda), or nothing for float32."""
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(batch["prompt_ids"].device.type, dtype=dtype)


def _sequence(batch, thought_id: int, num_thoughts: int):
    """[prompt, thoughts, target] ids, mask, position ids (counted over real tokens)."""
    B = batch["prompt_ids"].shape[0]
    th = torch.full((B, num_thoughts), thought_id, dtype=batch["prompt_ids"].dtype,
                    device=batch["prompt_ids"].device)
    ids = torch.cat([batch["prompt_ids"], th, batch["target_ids"]], 1).long()
    mask = torch.cat([batch["prompt_mask"], torch.ones_like(th), batch["target_mask"]], 1).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, pos


def _target_loss(logits, batch, start: int):
    """Token-mean CE of the targets; logits[:, start + j] predicts target j."""
    T = batch["target_ids"].shape[1]
    lg = logits[:, start:start + T].float()
    labels = batch["target_ids"].long().masked_fill(~batch["target_mask"].bool(), -100)
    return nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100)


def release_forward_loss(model, ratt, batch, thought_id: int, autocast_dtype=None):
    """Two full passes (N = 1), as the release trains: returns the loss."""
    ids, mask, pos = _sequence(batch, thought_id, 1)
    P = batch["prompt_ids"].shape[1]
    ctx = _autocast(batch, autocast_dtype)
    with ctx:
        emb = model.model.embed_tokens(ids)
        out = model.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos)
        hidden = out.last_hidden_state                                  # [B, S, d]
        r = ratt(hidden[:, :P], mask[:, :P], pos[:, :P])               # [B, d]
        slot = torch.zeros_like(emb)
        slot[:, P] = 1.0
        emb2 = emb * (1 - slot) + slot * r[:, None, :].to(emb.dtype)
        logits = model(inputs_embeds=emb2, attention_mask=mask, position_ids=pos).logits
        return _target_loss(logits, batch, P)


def release_sft_step(model, ratt, opt, batch, thought_id: int, autocast_dtype=None) -> float:
    opt.zero_grad(set_to_none=True)
    return _update(opt, release_forward_loss(model, ratt, batch, thought_id, autocast_dtype))


def plain_step(model, opt, batch, autocast_dtype=None) -> float:
    """One pass over [prompt, target] with loss on the targets: fwd + bwd + AdamW."""
    ids, mask, pos = _sequence(batch, 0, 0)
    P = batch["prompt_ids"].shape[1]
    opt.zero_grad(set_to_none=True)
    ctx = _autocast(batch, autocast_dtype)
    with ctx:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        loss = _target_loss(logits, batch, P - 1)
    return _update(opt, loss)


def _update(opt, loss) -> float:
    """Backward, clip the gradient norm to 1, AdamW step; the loss as a float (a sync)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return float(loss.detach())
