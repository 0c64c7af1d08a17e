"""PyTorch / transformers reference of the release's computations (for benchmarks).

- `LatentRATT`: the latent module of SPEC.md section 4 in torch.
- `build_causal_lm(config)`: a transformers Qwen2ForCausalLM or LlamaForCausalLM of a
  DecoderConfig's shape, and `load_jax_params` / `load_jax_latent` to give it /
  LatentRATT the weights of a JAX params tree.
- `release_sft_step`: the release's SFT step: a full causal-LM pass over [prompt,
  <|Thought|>, target] for the hidden states (its logits computed and dropped, as the
  release's first pass does), LatentRATT, a second full pass with the latent in the
  thought slot, cross-entropy on the target tokens, backward through both, AdamW.
- `plain_step`: one ordinary fwd + bwd + AdamW pass over [prompt, target].
- `train_step_fn`: either step, ready to time.
- `release_grpo_group_step`: the release's LR-GRPO step for one prompt's group of G: a
  no-grad rollout (latent pass + log-prob pass) then the loss (the same two passes with
  gradient into LatentRATT); its log-prob pass keeps logits for the target positions only.
- `shared_prefix_grpo_step`: our LR-GRPO step written in torch (the engine comparison):
  each prompt once into a KV cache, G suffixes [r_k, target] per prompt on it, rollout and
  update fused in one forward + backward, for a whole batch of prompts.
- `ReleaseTrieProcessor`, `release_trie_table`: the release's constrained decoding (a
  logits processor keyed by the generated ids as a string), and `latent_generation_model`:
  the release's latent model for `generate` (its prefill runs the latent pass first).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, Qwen2Config, Qwen2ForCausalLM


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


def hf_config(config):
    """transformers config of a DecoderConfig (the same fields `hf.config_to_hf` writes)."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                  rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
                  tie_word_embeddings=config.tie_word_embeddings,
                  max_position_embeddings=config.max_position_embeddings)
    if config.model_type == "llama":
        return LlamaConfig(attention_bias=config.attention_bias, mlp_bias=False, **common)
    return Qwen2Config(use_sliding_window=False, **common)


qwen2_config = hf_config  # the older name


def build_causal_lm(config, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """A randomly initialised (seed 0) transformers causal LM of `config`'s shape."""
    torch.manual_seed(0)
    cls = LlamaForCausalLM if config.model_type == "llama" else Qwen2ForCausalLM
    model = cls(hf_config(config))
    model.config._attn_implementation = attn_implementation
    return model.to(dtype)


build_qwen2 = build_causal_lm  # the older name


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
    """Two full passes (N = 1), as the release trains: returns the loss.

    The first pass is the whole causal LM, as the release's `generate_embs` calls it: the
    logits of every position are computed (and not used), and the last hidden state (after
    the final norm) feeds LatentRATT."""
    ids, mask, pos = _sequence(batch, thought_id, 1)
    P = batch["prompt_ids"].shape[1]
    ctx = _autocast(batch, autocast_dtype)
    with ctx:
        emb = model.get_input_embeddings()(ids)
        out = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                    output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]                                   # [B, S, d]
        r = ratt(hidden[:, :P], mask[:, :P], pos[:, :P])                # [B, d]
        slot = torch.zeros_like(emb)
        slot[:, P] = 1.0
        emb2 = emb * (1 - slot) + slot * r[:, None, :].to(emb.dtype)
        logits = model(inputs_embeds=emb2, attention_mask=mask, position_ids=pos,
                       use_cache=False).logits
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
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        loss = _target_loss(logits, batch, P - 1)
    return _update(opt, loss)


def _update(opt, loss) -> float:
    """Backward, clip the gradient norm to 1, AdamW step; the loss as a float (a sync)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- LR-GRPO


def _cache_names(model):
    """(keyword, output attribute) of the KV cache in this transformers version: `cache`
    from 5.x on, `past_key_values` before."""
    params = inspect.signature(model.model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


def ppo_clip_loss(logp, old_logp, adv, mask, clip_low: float = 0.2, clip_high: float = 0.28):
    """Token-mean PPO-clip loss: logp, old_logp, mask [R, T], adv [R]."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def negative_perplexity(logp, mask):
    """s = -exp(-mean log p(target)) per row."""
    return -torch.exp(-(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1))


def release_grpo_group_step(model, ratt, opt, prompt, target, thought_id: int, G: int = 8,
                            sigma: float = 1.5, generator=None) -> float:
    """The release's LR-GRPO step for one prompt (`prompt`, `target`: lists of ids): G
    identical rows [prompt, <|Thought|>, target] (no padding), four full passes.

    Rollout without gradient: the latent pass (the whole causal LM with hidden states;
    the release computes logits everywhere there) and the log-prob pass with r + eps_k in
    the thought slot, whose logits are kept for the T + 1 last positions only (the
    release's `logits_to_keep = completion length + 1`, the last one then dropped). The
    loss runs both passes again, the second with gradient back to LatentRATT (LLM frozen).
    The advantages are the batch-level ones over this single group."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    P, T = len(prompt), len(target)
    d = model.config.hidden_size
    ids = torch.tensor([list(prompt) + [thought_id] + list(target)] * G, device=device)
    embed = model.get_input_embeddings()
    positions = torch.arange(P, device=device)[None].expand(G, -1)
    noise = sigma * torch.randn(G, d, generator=generator).to(device=device, dtype=dtype)
    noise[0] = 0

    def passes():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        r = ratt(hidden[:, :P], torch.ones_like(positions), positions)
        emb = embed(ids).clone()
        emb[:, P] = r + noise
        logits = model(inputs_embeds=emb, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1)
        return logp.gather(-1, ids[:, P + 1:P + 1 + T, None])[..., 0]      # [G, T]

    with torch.no_grad():
        old = passes()
        s = negative_perplexity(old, torch.ones_like(old))
        adv = s - s[0]
        adv = adv / (adv.norm() + 1e-6)
    logp = passes()
    loss = ppo_clip_loss(logp, old, adv, torch.ones_like(logp))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def shared_prefix_grpo_step(model, ratt, opt, batch: dict, G: int = 8, sigma: float = 1.5,
                            generator=None, autocast_dtype=None) -> float:
    """Our LR-GRPO step (train/grpo), written with transformers, for the engine
    comparison: the same passes on the same batch as the JAX step.

    batch: prompt_ids/mask [Pn, S] (left-padded), target_ids/mask [Pn, T] (right-padded).
    Each prompt runs once, without gradient, into a KV cache; LatentRATT reads its last
    hidden states (with gradient); the cache is repeated G times and [r + eps_k,
    target[:-1]] runs on it for every sample, logits at the T target positions. The batch
    is used once, so the rollout's log-probs are the update's (ratio 1): one forward, the
    rewards and batch-level advantages from its detached copy, one backward to LatentRATT
    (LLM frozen)."""
    kw, attr = _cache_names(model)
    pid, pm = batch["prompt_ids"].long(), batch["prompt_mask"].long()
    tid, tm = batch["target_ids"].long(), batch["target_mask"].long()
    n, T = tid.shape
    d = model.config.hidden_size
    pos = (pm.cumsum(1) - 1).clamp(min=0)
    rep = lambda x: x.repeat_interleave(G, 0)
    with _autocast(batch, autocast_dtype):
        with torch.no_grad():
            out = model.model(input_ids=pid, attention_mask=pm, position_ids=pos, use_cache=True)
        cache = getattr(out, attr)
        r = ratt(out.last_hidden_state, pm, pos)                                # [n, d]
        noise = sigma * torch.randn(n, G, d, generator=generator).to(r.device)
        noise[:, 0] = 0
        noisy = (r[:, None, :].float() + noise).reshape(n * G, d)
        cache.batch_repeat_interleave(G)
        tgt_in = model.get_input_embeddings()(rep(tid[:, :-1]))
        emb = torch.cat([noisy[:, None, :].to(tgt_in.dtype), tgt_in], 1)      # [nG, T, d]
        mask = torch.cat([rep(pm), torch.ones_like(rep(tm[:, :1])), rep(tm[:, :-1])], 1)
        spos = rep(pos[:, -1:]) + 1 + torch.arange(T, device=pid.device)[None]
        logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=spos, use_cache=True,
                       **{kw: cache}).logits                                   # [nG, T, V]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, rep(tid)[..., None])[..., 0]
    m = rep(tm).float()
    with torch.no_grad():
        s = negative_perplexity(logp.detach(), m).reshape(n, G)
        centred = s - s[:, 0].mean()
        adv = (centred / (centred.norm() + 1e-6)).reshape(-1)
    loss = ppo_clip_loss(logp, logp.detach(), adv, m)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def shared_prefix_logprobs(model, ratt, batch: dict, noise) -> torch.Tensor:
    """The target log-probs [Pn * G, T] of `shared_prefix_grpo_step`'s forward for a
    given noise [Pn, G, d] (no update; for the parity check against JAX)."""
    kw, attr = _cache_names(model)
    pid, pm = batch["prompt_ids"].long(), batch["prompt_mask"].long()
    tid, tm = batch["target_ids"].long(), batch["target_mask"].long()
    n, G, d = noise.shape
    T = tid.shape[1]
    pos = (pm.cumsum(1) - 1).clamp(min=0)
    rep = lambda x: x.repeat_interleave(G, 0)
    with torch.no_grad():
        out = model.model(input_ids=pid, attention_mask=pm, position_ids=pos, use_cache=True)
        cache = getattr(out, attr)
        r = ratt(out.last_hidden_state, pm, pos)
        noisy = (r[:, None, :] + noise).reshape(n * G, d)
        cache.batch_repeat_interleave(G)
        tgt_in = model.get_input_embeddings()(rep(tid[:, :-1]))
        emb = torch.cat([noisy[:, None, :], tgt_in], 1)
        mask = torch.cat([rep(pm), torch.ones_like(rep(tm[:, :1])), rep(tm[:, :-1])], 1)
        spos = rep(pos[:, -1:]) + 1 + torch.arange(T)[None]
        logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=spos, use_cache=True,
                       **{kw: cache}).logits
        return torch.log_softmax(logits.float(), -1).gather(-1, rep(tid)[..., None])[..., 0]


# --------------------------------------------------------------------------- beam search


def _key(ids) -> str:
    """The release's dictionary key for a list of token ids: the ids joined by '-'."""
    return "-".join(str(i) for i in ids)


def release_trie_table(titles, heads, head_len: int = 5) -> dict:
    """The release's constraint table: key of a generated prefix -> allowed next ids.

    `titles`: the token ids of every catalog title as generated (EOS last). The first
    token's key is the last `head_len` ids before generation (the response header and, for
    the latent model, the thought token; `heads`: every such tail that occurs); the key of
    every later token is the title's ids generated so far."""
    table = {}
    for t in titles:
        t = list(t)
        for i in range(len(t)):
            keys = [_key(h[-head_len:]) for h in heads] if i == 0 else [_key(t[:i])]
            for k in keys:
                table.setdefault(k, set()).add(t[i])
    return {k: list(v) for k, v in table.items()}


class ReleaseTrieProcessor(LogitsProcessor):
    """The release's constrained-decoding logits processor (its evaluation runs it with
    guidance scale 1 and no collaborative logits), rewritten: log-softmax of the scores,
    then every beam, one at a time in Python, looks its generated ids up in the table by
    string key; allowed ids keep their score, all others get -1e6 (a beam with no entry
    keeps -1e6 everywhere). Stateful: it counts its calls to know how many ids of each row
    are generated, so a fresh one is needed for every `generate` call."""

    def __init__(self, table: dict, num_beams: int, head_len: int = 5):
        self.table, self.num_beams, self.head_len = table, num_beams, head_len
        self.calls = 0

    def __call__(self, input_ids, scores):
        scores = torch.log_softmax(scores, dim=-1)
        mask = torch.full_like(scores, -1000000.0)
        width = input_ids.shape[-1]
        for b, beams in enumerate(input_ids.view(-1, self.num_beams, width)):
            for k, row in enumerate(beams):
                tail = row[-self.head_len:] if self.calls == 0 else row[width - self.calls:]
                allowed = self.table.get(_key(tail.tolist()))
                if allowed:
                    mask[b * self.num_beams + k, allowed] = 0
        self.calls += 1
        return scores + mask


def latent_generation_model(model, ratt, thought_id: int):
    """`model` (a transformers causal LM) turned into the release's latent model for
    `generate`: when a call sees the whole prompt (ids as long as the attention mask: the
    prefill), it first runs the full causal LM on it for the hidden states (logits of every
    position computed, as the release's forward does), lets LatentRATT (query: the slot
    before <|Thought|>, keys: the prompt up to it, RoPE positions 0..S-1) make the latent,
    puts it in the thought slot's embedding and runs the pass that `generate` reads. Its
    forward takes no `logits_to_keep`, as the release's does not, so `generate` gets the
    logits of every prefill position. The prompts must end with <|Thought|>."""
    base = type(model)

    class LatentLM(base):
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
            if (input_ids is not None and inputs_embeds is None and attention_mask is not None
                    and input_ids.shape == attention_mask.shape):
                inputs_embeds = self._with_latent(input_ids, attention_mask)
                input_ids = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   inputs_embeds=inputs_embeds, **kwargs)

        def _with_latent(self, input_ids, attention_mask):
            S = input_ids.shape[1]
            if not bool((input_ids[:, -1] == thought_id).all()):
                raise ValueError("every prompt must end with the <|Thought|> id")
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1][:, :S - 1]
            pos = torch.arange(S - 1, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
            r = ratt(hidden, attention_mask[:, :S - 1], pos)
            emb = self.get_input_embeddings()(input_ids).clone()
            emb[:, S - 1] = r.to(emb.dtype)
            return emb

    model.__class__ = LatentLM
    model.latent_ratt = ratt
    return model
