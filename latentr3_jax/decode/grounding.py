"""BIGRec grounding (SPEC.md section 7): free generation, then nearest catalog items by L2.

The generated title and every catalog title are embedded as the model's last-layer
last-token hidden state (after the final norm, as HF `hidden_states[-1][:, -1]`); all items
are ranked by the L2 distance between the two. Catalog embeddings are computed once per
(params, catalog) and kept in a `CatalogEmbeddings` object the caller owns.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latentr3_jax.data.prompts import normalize_title
from latentr3_jax.decode.beam import free_generate
from latentr3_jax.model import decoder
from latentr3_jax.model.config import DecoderConfig


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _last_hidden(config, params, ids, mask, dtype=jnp.float32):
    _, hidden, _ = decoder.apply(config, params, ids, attention_mask=mask, dtype=dtype,
                                 return_logits=False)
    return hidden[:, -1].astype(jnp.float32)


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 16):
    width = max(1, max(len(s) for s in seqs))
    width = -(-width // multiple) * multiple
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s):] = s
            mask[r, width - len(s):] = 1
    return ids, mask


def embed_texts(config: DecoderConfig, params: dict, tokenizer, texts: Sequence[str], *,
                batch_size: int = 64, dtype=jnp.float32) -> np.ndarray:
    """Last-token final hidden state [n, d] of each text (an empty text embeds as EOS)."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        seqs = [tokenizer.encode(t) or [tokenizer.eos_id] for t in chunk]
        n = len(seqs)
        seqs = seqs + [seqs[0]] * (batch_size - n) if len(texts) > batch_size else seqs
        ids, mask = _pad_left(seqs, tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        out.append(np.asarray(_last_hidden(config, params, ids, mask, dtype))[:n])
    return np.concatenate(out, axis=0) if out else np.zeros((0, config.hidden_size), np.float32)


@jax.jit
def _leaf_stats(params):
    def stats(x):
        flat = jnp.ravel(x).astype(jnp.float32)
        sample = flat[::max(1, flat.shape[0] // 64)][:64]
        return jnp.concatenate([jnp.sum(flat)[None], jnp.sum(flat * flat)[None], sample])
    return jax.tree.map(stats, params)


def params_fingerprint(config: DecoderConfig, params: dict) -> str:
    """Cheap content hash of the weights: per-leaf sums of x and x^2 and a strided sample,
    reduced on device (no full transfer of a large model)."""
    h = hashlib.sha1(repr(config).encode())
    for path, v in jax.tree_util.tree_leaves_with_path(_leaf_stats(params)):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.asarray(v).tobytes())
    return h.hexdigest()


def catalog_fingerprint(catalog) -> str:
    h = hashlib.sha1()
    for i in catalog.ids:
        h.update(f"{i}\t{catalog.titles[i]}\n".encode())
    return h.hexdigest()


class CatalogEmbeddings:
    """Embeddings of every catalog title, cached per (params fingerprint, catalog)."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, config, params, tokenizer, catalog, *, dtype=jnp.float32) -> np.ndarray:
        key = (params_fingerprint(config, params), catalog_fingerprint(catalog), str(dtype))
        if key not in self._cache:
            texts = [normalize_title(catalog.titles[i]) for i in catalog.ids]
            self._cache[key] = embed_texts(config, params, tokenizer, texts, dtype=dtype)
        return self._cache[key]

    def __len__(self) -> int:
        return len(self._cache)


@jax.jit
def _l2_topk_impl(queries, items, k_idx):
    d2 = (jnp.sum(queries * queries, 1, keepdims=True) - 2.0 * queries @ items.T
          + jnp.sum(items * items, 1)[None, :])
    order = jnp.argsort(d2, axis=1, stable=True)[:, :k_idx.shape[0]]
    return order, jnp.take_along_axis(d2, order, axis=1)


def l2_rank(queries: np.ndarray, items: np.ndarray, top: int) -> tuple:
    """(item positions [n, top] nearest first, squared distances); ties keep item order."""
    top = min(top, items.shape[0])
    order, d2 = _l2_topk_impl(jnp.asarray(queries, jnp.float32), jnp.asarray(items, jnp.float32),
                              jnp.zeros((top,), jnp.int32))
    return np.asarray(order), np.asarray(d2)


def ground(config: DecoderConfig, params: dict, tokenizer, catalog, prompt_ids, prompt_mask, *,
           catalog_embeddings: np.ndarray, num_beams: int = 4, max_new_tokens: int = 32,
           num_thoughts: int = 0, latent_mode: str = "ratt", top: int = 20,
           dtype=jnp.float32, catalog_titles: Optional[set] = None) -> list:
    """Generate a title per prompt and rank the catalog by L2 distance to it.

    Returns one dict per prompt row: generated (title text), oov (not a catalog title under
    the title rule), ranked_ids (top `top` item ids), distances.
    """
    res = free_generate(config, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
                        max_len=max_new_tokens, eos_id=tokenizer.eos_id, num_beams=num_beams,
                        num_thoughts=num_thoughts, latent_mode=latent_mode, dtype=dtype)
    tokens, length = np.asarray(res.tokens[:, 0]), np.asarray(res.length[:, 0])
    texts = []
    for toks, n in zip(tokens, length):
        toks = [int(t) for t in toks[:n] if int(t) != tokenizer.eos_id]
        texts.append(normalize_title(tokenizer.decode(toks)))
    if catalog_titles is None:
        catalog_titles = {normalize_title(t) for t in catalog.titles.values()}
    emb = embed_texts(config, params, tokenizer, texts, dtype=dtype)
    order, d2 = l2_rank(emb, catalog_embeddings, top)
    ids = np.asarray(catalog.ids)
    return [{"generated": t, "oov": t not in catalog_titles, "ranked_ids": ids[o].tolist(),
             "distances": np.sqrt(np.maximum(d, 0.0)).tolist()}
            for t, o, d in zip(texts, order, d2)]
