"""Trie-constrained beam search over a batch of users, one jitted function (SPEC.md section 7).

The prompt (and, for a LatentR³ model, its thought latents) runs once per user into the KV
cache; the decode then runs in a `lax.while_loop`.
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

The prompt cache is not copied per beam: each decode step attends to the user's prompt
cache (shared by its B beams) and to the beams' own small decode cache, which is the only
thing reordered by parent beam each step. The decode cache grows in stages
(`cache_buckets`, by default 16, 32, 64, ... up to `max_len`): a step's attention and
reorder cost what the cache holds, not the longest title, and a search whose users all
end within the first stage never touches the larger ones (one `lax.while_loop` per stage,
the next behind a `lax.cond`; each stage compiles once).

Without a trie (`trie=None`) the same loop is free generation: every token is allowed and
a hypothesis finishes at EOS or at `max_len` (used for BIGRec grounding).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from latentr3_jax.decode.trie import TrieArrays, child_table
from latentr3_jax.model import decoder, latent, mixed
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


LATENT_COMBINES = ("logmeanexp", "max")


def latent_sample_noise(hidden_size: int, samples: int, sigma: float, seed: int = 0) -> jax.Array:
    """[samples, d] offsets of a test-time latent ensemble: row 0 is zero (the model's own
    latent), rows 1.. are sigma * N(0, I) from a fixed key, the same for every user, so a
    user's ranking does not depend on the batch it is decoded in. (d: the latent width,
    `latent.latent_width`: K * hidden with K latent factors, every factor perturbed.)"""
    eps = jax.random.normal(jax.random.PRNGKey(seed), (samples, hidden_size), jnp.float32)
    return (sigma * eps).at[0].set(0.0)


def prefill_first_logits(config: DecoderConfig, params: dict, prompt_ids, prompt_mask, *,
                         num_thoughts: int, latent_mode: str, dtype, latent_noise=None):
    """Prompt (+ thoughts) into a cache of exactly P + N slots (P + K with K latent factors).

    Returns (logits [B, V] for the first generated token, cache). `latent_noise` [M, d]
    (a latent ensemble): the prompt runs once, then each user's cache is repeated M times
    and sample m puts latent + latent_noise[m] in the last thought slot; the rows come out
    user-major ([B * M, V], user i's samples at rows i*M .. i*M + M-1).
    """
    latents, cache, last_hidden = latent.prefill_and_latents(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, suffix_len=1 if num_thoughts else 0, dtype=dtype)
    if num_thoughts:
        last = latents[:, -1]                                  # [B, d] ([B, K * d]: K factors)
        if latent_noise is not None:
            M = latent_noise.shape[0]
            cache = {k: v if k == "index" else jnp.repeat(v, M, axis=1 if k in ("k", "v") else 0)
                     for k, v in cache.items()}
            last = (jnp.repeat(last, M, axis=0)
                    + jnp.tile(latent_noise, (latents.shape[0], 1)).astype(last.dtype))
        slots = latent.factor_slots(config, last)              # [B(*M), K, d]
        _, hidden, cache = decoder.apply(config, params, inputs_embeds=slots, cache=cache,
                                         dtype=dtype, return_logits=False)
        return decoder.lm_head(config, params, hidden[:, -1:])[:, 0], cache
    return decoder.lm_head(config, params, last_hidden[:, None].astype(dtype))[:, 0], cache


def combine_samples(res: "BeamResult", samples: int, combine: str) -> "BeamResult":
    """Merge the M sample searches of each user ([b*M, B] user-major) into one list of B
    distinct titles: a title's score is the log of its mean exp-score over the M samples
    (a sample that did not return it adds 0 to the mean) or its best score ('max')."""
    if combine not in LATENT_COMBINES:
        raise ValueError(f"latent ensemble combine must be one of {LATENT_COMBINES}, got {combine!r}")
    bM, B = res.scores.shape
    b, M = bM // samples, samples
    sc = res.scores.reshape(b, M * B)
    ok = res.valid.reshape(b, M * B)
    leaf = res.leaf.reshape(b, M * B)
    same = (leaf[:, :, None] == leaf[:, None, :]) & ok[:, :, None] & ok[:, None, :]  # [b, MB, MB]
    sample_of = jnp.arange(M * B) // B
    # score of candidate c's title in each sample m (-inf where m did not return it)
    in_m = same[:, :, :, None] & (sample_of[None, None, :, None] == jnp.arange(M)[None, None, None, :])
    per_sample = jnp.max(jnp.where(in_m, sc[:, None, :, None], -jnp.inf), axis=2)        # [b, MB, M]
    if combine == "max":
        merged = per_sample.max(-1)
    else:
        merged = jax.scipy.special.logsumexp(per_sample, axis=-1) - math.log(M)
    first = ~jnp.any(same & (jnp.arange(M * B)[None, None, :] < jnp.arange(M * B)[None, :, None]),
                     axis=2)                       # the first copy of each title stands for it
    merged = jnp.where(ok & first, merged, _MASKED)
    top = jax.lax.top_k(merged, B)[1]
    scores = _gather_beams(merged, top)
    valid = scores > _VALID
    pick = lambda x: _gather_beams(x.reshape((b, M * B) + x.shape[2:]), top)
    return BeamResult(scores=scores, valid=valid, leaf=jnp.where(valid, pick(res.leaf), -1),
                      tokens=pick(res.tokens), length=jnp.where(valid, pick(res.length), 0))


def decode_step(config: DecoderConfig, params: dict, tokens, positions, prefix: dict, dec: dict,
                t, num_beams: int, dtype):
    """One new token per beam: tokens, positions [b*B] -> (logits [b*B, V], new decode cache).

    Attention reads each user's prompt cache once for all of its beams (`prefix`: k, v
    [L, b, S, K, D], mask [b, S]) plus the beams' own decode cache (`dec`: k, v
    [L, b*B, T, K, D], slots 0..t-1 visible) plus the new token itself, whose k, v are
    written at slot t after the layers have run: one in-place update of the whole cache
    per step. (Written inside the layer scan, the cache became a per-layer output that XLA
    copied whole at every step, and in bf16 also converted to float32 and back.) The
    decoder's own layer (`decoder.decoder_layer`) with that attention plugged in: same
    arithmetic as `decoder.apply` on a per-beam copy of the prompt cache, without the copy.
    The layer weights and both caches may be held as `decoder.to_bits` (bf16 / fp16 as
    uint16, read as `dtype`); the new cache comes back in the form `dec` came in.
    """
    c = config
    bB, B = tokens.shape[0], num_beams
    b = bB // B
    K, H, D = c.num_kv_heads, c.num_heads, c.head_dim
    G, T, S = H // K, dec["k"].shape[2], prefix["k"].shape[2]
    x = decoder.embed_tokens(c, params, tokens[:, None], dtype)                # [bB, 1, d]
    cos, sin = decoder.rope_tables(c, positions[:, None], dtype)
    prefix_mask = prefix["mask"].astype(bool)[:, None, None, None, :]          # [b,1,1,1,S]
    dec_visible = (jnp.arange(T) < t)[None, None, None, None, :]

    def layer(x, xs):
        lp, pk, pv, dk, dv = xs

        def attend(q, k, v):   # one softmax over the user's prompt, the beam's past and itself
            qg = q.reshape(b, B, K, G, D)
            kn = k.reshape(b, B, K, 1, D).astype(q.dtype)
            vn = v.reshape(b, B, K, 1, D).astype(q.dtype)
            dk5 = dk.reshape(b, B, T, K, D).astype(q.dtype)
            dv5 = dv.reshape(b, B, T, K, D).astype(q.dtype)
            s_pre = mixed.einsum("bnkgd,bskd->bkgns", qg, pk, jnp.float32)
            s_dec = mixed.einsum("bnkgd,bntkd->bkgnt", qg, dk5, jnp.float32)
            s_new = mixed.einsum("bnkgd,bnkod->bkgno", qg, kn, jnp.float32)
            s_pre = jnp.where(prefix_mask, s_pre / math.sqrt(D), decoder.NEG_INF)
            s_dec = jnp.where(dec_visible, s_dec / math.sqrt(D), decoder.NEG_INF)
            scores = jnp.concatenate([s_pre, s_dec, s_new / math.sqrt(D)], axis=-1)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            f32 = jnp.float32   # the three parts summed before the one rounding
            out = (mixed.einsum("bkgns,bskd->bnkgd", probs[..., :S], pv, f32)
                   + mixed.einsum("bkgnt,bntkd->bnkgd", probs[..., S:S + T], dv5, f32)
                   + mixed.einsum("bkgno,bnkod->bnkgd", probs[..., S + T:], vn, f32))
            return (out.astype(q.dtype).reshape(bB, 1, H, D),
                    (k.astype(dk.dtype), v.astype(dv.dtype)))

        return decoder.decoder_layer(c, lp, x, cos, sin, attend)

    x, (new_k, new_v) = decoder.scan_bits(layer, x, (params["layers"], prefix["k"], prefix["v"],
                                                     dec["k"], dec["v"]), dtype)  # [L, bB, 1, K, D]
    if dec["k"].dtype != jnp.uint16:
        new_k, new_v = decoder.from_bits((new_k, new_v), dtype)
    dec = {"k": jax.lax.dynamic_update_slice_in_dim(dec["k"], new_k, t, axis=2),
           "v": jax.lax.dynamic_update_slice_in_dim(dec["v"], new_v, t, axis=2)}
    hidden = decoder.rms_norm(x, params["final_norm"]["scale"], c.rms_norm_eps)
    return decoder.lm_head(c, params, hidden)[:, 0], dec


def decode_cache_buckets(max_len: int, first: int = 16) -> tuple:
    """The decode cache's capacities, stage by stage: first, 2 x first, ... then max_len."""
    if max_len < 1 or first < 1:
        raise ValueError(f"max_len and the first cache bucket must be positive, got "
                         f"{max_len} and {first}")
    caps, c = [], int(first)
    while c < max_len:
        caps.append(c)
        c *= 2
    return tuple(caps) + (int(max_len),)


def _check_buckets(buckets, max_len: int) -> tuple:
    caps = tuple(int(c) for c in buckets)
    if (not caps or caps[-1] != max_len or any(c < 1 for c in caps)
            or any(a >= b for a, b in zip(caps, caps[1:]))):
        raise ValueError(f"cache_buckets must rise strictly and end at max_len={max_len}, "
                         f"got {buckets}")
    return caps


def _static(buckets):
    """A list of buckets as the hashable tuple a static jit argument must be."""
    return None if buckets is None else tuple(int(c) for c in buckets)


def _gather_beams(x, idx):
    """x [b, k, ...], idx [b, m] -> [b, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=(
    "config", "num_beams", "max_len", "length_penalty", "num_thoughts", "latent_mode", "eos_id",
    "dtype", "latent_samples", "latent_combine", "cache_buckets"))
def beam_search(config: DecoderConfig, params: dict, trie: Optional[TrieArrays], prompt_ids,
                prompt_mask, *, num_beams: int = 10, max_len: int, length_penalty: float = 1.0,
                num_thoughts: int = 0, latent_mode: str = "ratt", eos_id: int = -1,
                dtype=jnp.float32, latent_noise=None, latent_samples: int = 1,
                latent_combine: str = "logmeanexp",
                cache_buckets: Optional[tuple] = None) -> BeamResult:
    """Beam search for a batch of left-padded prompts [b, P].

    With a trie, `max_len` is the trie's longest title (`ItemTrie.max_len`) and `eos_id` is
    unused (a hypothesis ends at a leaf); without one, it ends at `eos_id` or `max_len`.

    A test-time latent ensemble (`latent_samples` = M > 1, `latent_noise` [M, d] from
    `latent_sample_noise`, a model with thoughts): each user's prompt runs once, M latents
    go in the thought slot, M independent searches of `num_beams` run side by side as
    M x num_beams rows, and `combine_samples` merges them per user.

    `cache_buckets`: the decode cache's capacity stage by stage (rising, the last equal to
    `max_len`; default `decode_cache_buckets(max_len)`). `(max_len,)` is one stage with
    the whole cache. The stages change how much masked cache a step reads, not the result.
    """
    caps = _check_buckets(cache_buckets if cache_buckets is not None
                          else decode_cache_buckets(max_len), max_len)
    ensemble = int(latent_samples) > 1
    if ensemble and (not num_thoughts or trie is None or latent_noise is None
                     or latent_noise.shape[0] != latent_samples):
        raise ValueError("a latent ensemble needs a model with thoughts, a trie (titles are "
                         "merged by leaf) and latent_noise [latent_samples, hidden]")
    first_logits, prefix = prefill_first_logits(
        config, params, prompt_ids, prompt_mask, num_thoughts=num_thoughts,
        latent_mode=latent_mode, dtype=dtype, latent_noise=latent_noise if ensemble else None)
    b = first_logits.shape[0]     # users x samples
    B, V = num_beams, config.vocab_size
    positions0 = jnp.repeat(prefix["next_pos"], B)                        # [b*B]
    dec_shape = (config.num_layers, b * B, caps[0], config.num_kv_heads, config.head_dim)
    dec = {"k": jnp.zeros(dec_shape, prefix["k"].dtype), "v": jnp.zeros(dec_shape, prefix["v"].dtype)}
    logits = jnp.repeat(first_logits, B, axis=0)           # [b*B, V]

    # The decode loop's frozen weights and caches, cast once and held as `decoder.to_bits`
    # (see `decoder.scan_bits`): the loop then never converts them.
    step_params = decoder.matmul_weights(params, dtype)
    step_params = dict(step_params, layers=decoder.to_bits(step_params["layers"]))
    prefix = dict(prefix, k=decoder.to_bits(prefix["k"]), v=decoder.to_bits(prefix["v"]))
    dec = decoder.to_bits(dec)
    state = dict(
        t=jnp.zeros((), jnp.int32), dec=dec, logits=logits,
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

        # reorder the beams' decode caches by parent beam (per user: the batch axis stays
        # sharded), then feed the new tokens
        dec = {}
        for name in ("k", "v"):
            kv = s["dec"][name]                                             # [L, b*B, T, K, D]
            kv = kv.reshape((kv.shape[0], b, B) + kv.shape[2:])
            kv = jnp.take_along_axis(kv, run_beam[None, :, :, None, None, None], axis=2)
            dec[name] = kv.reshape((kv.shape[0], b * B) + kv.shape[3:])
        new_tok = _gather_beams(top_tok, keep).reshape(-1)
        logits, dec = decode_step(config, step_params, new_tok, positions0 + t, prefix, dec, t, B,
                                  dtype)

        # HF's early-stopping heuristic, at the new length
        best_possible = run_scores[:, 0] / length ** length_penalty
        full = jnp.all(fin_scores > _VALID, axis=1)
        cannot_improve = full & (best_possible <= fin_scores.min(axis=1))
        still_running = run_scores[:, 0] > _VALID
        open_ = s["open"] & ~cannot_improve & still_running
        return dict(t=t + 1, dec=dec, logits=logits, run_scores=run_scores,
                    run_nodes=run_nodes, run_tokens=run_tokens, fin_scores=fin_scores,
                    fin_leaf=fin_leaf, fin_tokens=fin_tokens, fin_len=fin_len, open=open_)

    def grow(s, capacity):     # zero slots appended to the decode cache (never visible yet)
        pad = [(0, 0)] * 5
        pad[2] = (0, capacity - s["dec"]["k"].shape[2])
        return dict(s, dec={k: jnp.pad(v, pad) for k, v in s["dec"].items()})

    def finished(s):
        return {k: s[k] for k in ("fin_scores", "fin_leaf", "fin_tokens", "fin_len")}

    def stage(i, s):           # steps until the cache of caps[i] is full, then the next stage
        cap = caps[i]
        s = jax.lax.while_loop(lambda s: cond(s) & (s["t"] < cap), body, s)
        if i + 1 == len(caps):
            return finished(s)
        return jax.lax.cond(cond(s), lambda s: stage(i + 1, grow(s, caps[i + 1])), finished, s)

    s = stage(0, state)
    valid = s["fin_scores"] > _VALID
    res = BeamResult(scores=s["fin_scores"], valid=valid, leaf=jnp.where(valid, s["fin_leaf"], -1),
                     tokens=s["fin_tokens"], length=jnp.where(valid, s["fin_len"], 0))
    return combine_samples(res, int(latent_samples), latent_combine) if ensemble else res


def constrained_beam_search(config, params, trie: TrieArrays, prompt_ids, prompt_mask, *,
                            max_len: int, num_beams: int = 10, length_penalty: float = 1.0,
                            num_thoughts: int = 0, latent_mode: str = "ratt",
                            dtype=jnp.float32, latent_samples: int = 1,
                            latent_sigma: float = 0.0, latent_combine: str = "logmeanexp",
                            latent_seed: int = 0, cache_buckets: Optional[tuple] = None
                            ) -> BeamResult:
    """Top-`num_beams` distinct catalog titles (trie leaves) per user, best first.

    `latent_samples` = M > 1 (a model with thoughts): a test-time latent ensemble of the
    model's latent and M - 1 latents with sigma * N(0, I) added (`latent_sample_noise`),
    scores combined per title by `latent_combine` (logmeanexp | max).
    """
    M = int(latent_samples)
    noise = None
    if M > 1:
        if not num_thoughts:
            raise ValueError("eval.latent_samples > 1 needs a model with latent thoughts")
        noise = latent_sample_noise(latent.latent_width(config, params), M, float(latent_sigma),
                                    int(latent_seed))
    return beam_search(config, params, trie, prompt_ids, prompt_mask, num_beams=num_beams,
                       max_len=max_len, length_penalty=float(length_penalty),
                       num_thoughts=num_thoughts, latent_mode=latent_mode, dtype=dtype,
                       latent_noise=noise, latent_samples=M, latent_combine=latent_combine,
                       cache_buckets=_static(cache_buckets))


def free_generate(config, params, prompt_ids, prompt_mask, *, max_len: int, eos_id: int,
                  num_beams: int = 1, length_penalty: float = 1.0, num_thoughts: int = 0,
                  latent_mode: str = "ratt", dtype=jnp.float32,
                  cache_buckets: Optional[tuple] = None) -> BeamResult:
    """Unconstrained beam search (num_beams=1: greedy), ending at EOS or `max_len`."""
    return beam_search(config, params, None, prompt_ids, prompt_mask, num_beams=num_beams,
                       max_len=max_len, length_penalty=float(length_penalty),
                       num_thoughts=num_thoughts, latent_mode=latent_mode, eos_id=int(eos_id),
                       dtype=dtype, cache_buckets=_static(cache_buckets))
