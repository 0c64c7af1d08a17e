"""Trie-constrained beam search over a batch of users, one jitted function (SPEC.md section 7).

The prompt (and, for a LatentR³ model, its thought latents) runs once per user into the KV
cache; the cache is then repeated once per beam and the decode runs in a `lax.while_loop`.
Each step follows Hugging Face's beam search exactly, so rankings match `generate(
num_beams=B, length_penalty=...)` with a prefix-trie `prefix_allowed_tokens_fn`:

- log-softmax of the next-token logits; tokens outside the trie get a large negative score
  (no renormalisation, as a logits processor after the log-softmax);
- the 2B best (beam, token) continuations by accumulated log-probability;
- those reaching a leaf (the title's EOS) among the first B become finished hypotheses with
  score sum_logprobs / generated_len ** length_penalty (generated_len counts the EOS);
- the B best of the others keep running;
- a user stops once all B finished slots are taken and the best running beam, normalised
  at the current length, cannot beat the worst finished one (HF's `early_stopping=False`).

Only the decode slots of the cache are reordered by beam each step: the prompt slots are
the same for every beam of a user.

Without a trie (`trie=None`) the same loop is free generation: every token is allowed and
a hypothesis finishes at EOS or at `max_len` (used for BIGRec grounding).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from latentr3_jax.decode.trie import TrieArrays, child_table
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import DecoderConfig

_MASKED = -1e30   # score of a token outside the trie (finite: no inf - inf)
_DUMMY = -1e9     # HF's initial score of beams 1..B-1 and its "finished" penalty
_VALID = -1e8     # accumulated scores above this are real hypotheses


class BeamResult(NamedTuple):
    """Finished hypotheses per user, best first. Arrays are [batch, beams] unless noted."""

    scores: jax.Array   # float32 length-penalised score (invalid slots: -1e30)
    valid: jax.Array    # bool, a real hypothesis
    leaf: jax.Array     # int32 distinct-title index in the trie, -1 without a trie / invalid
    tokens: jax.Array   # [batch, beams, max_len] int32 generated ids, pad after the end
    length: jax.Array   # int32 generated tokens, EOS included


def prefill_first_logits(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, *,
                         num_thoughts: int, latent_mode: str, decode_len: int, dtype):
    """Prompt (+ thoughts) into a cache with room for `decode_len` tokens.

    Returns (logits [B, V] for the first generated token, cache).
    """
    latents, cache, last_hidden = latent.prefill_and_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=decode_len + (1 if num_thoughts else 0), dtype=dtype)
    if num_thoughts:
        logits, _, cache = decoder.apply(config, params, inputs_embeds=latents[:, -1:], cache=cache,
                                         dtype=dtype)
        return logits[:, 0], cache
    return decoder.lm_head(config, params, last_hidden[:, None].astype(dtype))[:, 0], cache


def _gather_beams(x, idx):
    """x [b, k, ...], idx [b, m] -> [b, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=(
    "config", "num_beams", "max_len", "length_penalty", "num_thoughts", "latent_mode", "eos_id",
    "dtype"))
def beam_search(config: DecoderConfig, params: dict, trie: Optional[TrieArrays], prompt_ids,
                prompt_mask, *, num_beams: int = 10, max_len: int, length_penalty: float = 1.0,
                num_thoughts: int = 0, latent_mode: str = "ratt", eos_id: int = -1,
                dtype=jnp.float32) -> BeamResult:
    """Beam search for a batch of left-padded prompts [b, P].

    With a trie, `max_len` is the trie's longest title (`ItemTrie.max_len`) and `eos_id` is
    unused (a hypothesis ends at a leaf); without one, it ends at `eos_id` or `max_len`.
    """
    b = prompt_ids.shape[0]
    B, V = num_beams, config.vocab_size
    first_logits, cache = prefill_first_logits(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, decode_len=max_len, dtype=dtype)
    decode_start = prompt_ids.shape[1] + num_thoughts      # static: first decode slot
    cache = decoder.repeat_cache(cache, B)
    logits = jnp.repeat(first_logits, B, axis=0)           # [b*B, V]

    state = dict(
        t=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
        run_scores=jnp.tile(jnp.array([0.0] + [_DUMMY] * (B - 1), jnp.float32), (b, 1)),
        run_nodes=jnp.zeros((b, B), jnp.int32),
        run_tokens=jnp.zeros((b, B, max_len), jnp.int32),
        fin_scores=jnp.full((b, B), _MASKED, jnp.float32),
        fin_leaf=jnp.full((b, B), -1, jnp.int32),
        fin_tokens=jnp.zeros((b, B, max_len), jnp.int32),
        fin_len=jnp.zeros((b, B), jnp.int32),
        open=jnp.ones((b,), bool),
    )

    def cond(s):
        return (s["t"] < max_len) & jnp.any(s["open"])

    def body(s):
        t = s["t"]
        logp = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1)   # [b*B, V]
        if trie is not None:
            child = child_table(trie, s["run_nodes"].reshape(-1), V)          # [b*B, V]
            logp = jnp.where(child >= 0, logp, _MASKED)
        acc = (logp.reshape(b, B, V) + s["run_scores"][..., None]).reshape(b, B * V)
        top_scores, top_idx = jax.lax.top_k(acc, 2 * B)                       # [b, 2B]
        top_beam, top_tok = top_idx // V, top_idx % V
        if trie is not None:
            top_node = jnp.take_along_axis(child.reshape(b, B * V), top_idx, axis=1)
            top_leaf = trie.leaf_index[jnp.maximum(top_node, 0)]
            ends = top_leaf >= 0
        else:
            top_node = jnp.zeros_like(top_tok)
            top_leaf = jnp.full_like(top_tok, -1)
            ends = top_tok == eos_id
        ends = ends | (t + 1 >= max_len)
        top_tokens = _gather_beams(s["run_tokens"], top_beam)
        top_tokens = top_tokens.at[:, :, t].set(top_tok)                      # [b, 2B, T]

        # running beams: the B best continuations that did not finish
        keep = jax.lax.top_k(top_scores + ends * _DUMMY, B)[1]
        run_scores = _gather_beams(top_scores + ends * _DUMMY, keep)
        run_beam = _gather_beams(top_beam, keep)
        run_nodes = _gather_beams(top_node, keep)
        run_tokens = _gather_beams(top_tokens, keep)

        # finished hypotheses: finishing continuations among the first B enter the pool
        length = (t + 1).astype(jnp.float32)
        norm = top_scores / length ** length_penalty
        in_top = jnp.arange(2 * B)[None, :] < B
        new_fin = ends & in_top & s["open"][:, None] & (top_scores > _VALID)
        cand = jnp.where(new_fin, norm, _MASKED)
        merged = jnp.concatenate([s["fin_scores"], cand], axis=1)            # [b, 3B]
        best = jax.lax.top_k(merged, B)[1]
        fin_scores = _gather_beams(merged, best)
        fin_leaf = _gather_beams(jnp.concatenate([s["fin_leaf"], top_leaf], 1), best)
        fin_tokens = _gather_beams(jnp.concatenate([s["fin_tokens"], top_tokens], 1), best)
        fin_len = _gather_beams(jnp.concatenate(
            [s["fin_len"], jnp.full((b, 2 * B), t + 1, jnp.int32)], 1), best)

        # reorder the decode slots of the cache by parent beam, then feed the new tokens
        # (gathered per user along the beam axis: the batch axis stays sharded)
        cache = dict(s["cache"])
        for name in ("k", "v"):
            kv = cache[name]                                                # [L, b*B, S, K, D]
            L_, _, S_, K_, D_ = kv.shape
            dec = kv[:, :, decode_start:].reshape(L_, b, B, S_ - decode_start, K_, D_)
            dec = jnp.take_along_axis(dec, run_beam[None, :, :, None, None, None], axis=2)
            cache[name] = kv.at[:, :, decode_start:].set(dec.reshape(L_, b * B, -1, K_, D_))
        new_tok = _gather_beams(top_tok, keep).reshape(-1, 1)
        logits, _, cache = decoder.apply(config, params, new_tok, cache=cache, dtype=dtype)

        # HF's early-stopping heuristic, at the new length
        best_possible = run_scores[:, 0] / length ** length_penalty
        full = jnp.all(fin_scores > _VALID, axis=1)
        cannot_improve = full & (best_possible <= fin_scores.min(axis=1))
        still_running = run_scores[:, 0] > _VALID
        open_ = s["open"] & ~cannot_improve & still_running
        return dict(t=t + 1, cache=cache, logits=logits[:, 0], run_scores=run_scores,
                    run_nodes=run_nodes, run_tokens=run_tokens, fin_scores=fin_scores,
                    fin_leaf=fin_leaf, fin_tokens=fin_tokens, fin_len=fin_len, open=open_)

    s = jax.lax.while_loop(cond, body, state)
    valid = s["fin_scores"] > _VALID
    return BeamResult(scores=s["fin_scores"], valid=valid, leaf=jnp.where(valid, s["fin_leaf"], -1),
                      tokens=s["fin_tokens"], length=jnp.where(valid, s["fin_len"], 0))


def constrained_beam_search(config, params, trie: TrieArrays, prompt_ids, prompt_mask, *,
                            max_len: int, num_beams: int = 10, length_penalty: float = 1.0,
                            num_thoughts: int = 0, latent_mode: str = "ratt",
                            dtype=jnp.float32) -> BeamResult:
    """Top-`num_beams` distinct catalog titles (trie leaves) per user, best first."""
    return beam_search(config, params, trie, prompt_ids, prompt_mask, num_beams=num_beams,
                       max_len=max_len, length_penalty=float(length_penalty),
                       num_thoughts=num_thoughts, latent_mode=latent_mode, dtype=dtype)


def free_generate(config, params, prompt_ids, prompt_mask, *, max_len: int, eos_id: int,
                  num_beams: int = 1, length_penalty: float = 1.0, num_thoughts: int = 0,
                  latent_mode: str = "ratt", dtype=jnp.float32) -> BeamResult:
    """Unconstrained beam search (num_beams=1: greedy), ending at EOS or `max_len`."""
    return beam_search(config, params, None, prompt_ids, prompt_mask, num_beams=num_beams,
                       max_len=max_len, length_penalty=float(length_penalty),
                       num_thoughts=num_thoughts, latent_mode=latent_mode, eos_id=int(eos_id),
                       dtype=dtype)
