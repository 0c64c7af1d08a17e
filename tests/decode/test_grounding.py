"""BIGRec grounding: generated text, embeddings and the L2 ranking vs numpy brute force."""

import jax
import jax.numpy as jnp
import numpy as np

from _eval_helpers import random_params
from latentr3_jax.data import Catalog, train_tokenizer
from latentr3_jax.decode import grounding
from latentr3_jax.decode.beam import free_generate
from latentr3_jax.eval.metrics import normalize_title
from latentr3_jax.model import decoder
from latentr3_jax.model.config import tiny_config

TITLES = ["Abbey Road", "Greatest Hits", "Greatest Hits", "Thriller", "Back in Black",
          "The Dark Side of the Moon", "Rumours", "Hotel California", "Greatest Hits Vol. 2",
          "Back to Black", "Road Trip", "Hits"]


def _setup():
    catalog = Catalog(titles={10 + i: t for i, t in enumerate(TITLES)})
    tok = train_tokenizer([f'"{t}"\n' for t in TITLES] * 3 + ["the user has played"] * 3, 300)
    config = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         eos_token_id=tok.eos_id)
    params = random_params(config, 0, std=0.3)
    _setup.config = config
    return catalog, tok, config, params


@jax.jit
def _hidden_right_padded(params, ids):
    config = _setup.config
    return decoder.apply(config, params, ids, return_logits=False)[1]


def _embed_one(config, params, tok, text):
    """Independent of the left-padded path: right-pad (causal) and read the last real slot."""
    ids = tok.encode(text) or [tok.eos_id]
    padded = np.zeros((1, 32), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(_hidden_right_padded(params, jnp.asarray(padded))[0, len(ids) - 1])


def test_grounding_matches_numpy_l2_ranking():
    catalog, tok, config, params = _setup()
    cache = grounding.CatalogEmbeddings()
    emb = cache.get(config, params, tok, catalog)
    ref_emb = np.stack([_embed_one(config, params, tok, normalize_title(catalog.titles[i]))
                        for i in catalog.ids])
    np.testing.assert_allclose(emb, ref_emb, atol=1e-4, rtol=1e-4)
    assert cache.get(config, params, tok, catalog) is emb and len(cache) == 1
    params2 = jax.tree.map(lambda x: x * 1.01, params)
    cache.get(config, params2, tok, catalog)
    assert len(cache) == 2                      # new weights -> new embeddings

    prompts = [tok.encode("the user has played"), tok.encode('"Abbey Road"\n"Thriller"')]
    P = max(map(len, prompts))
    ids = np.zeros((2, P), np.int32)
    mask = np.zeros((2, P), np.int32)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):], mask[r, P - len(p):] = p, 1
    out = grounding.ground(config, params, tok, catalog, ids, mask, catalog_embeddings=emb,
                           num_beams=2, max_new_tokens=8, top=len(TITLES))

    gen = free_generate(config, params, jnp.asarray(ids), jnp.asarray(mask), max_len=8,
                        eos_id=tok.eos_id, num_beams=2)
    for r, row in enumerate(out):
        n = int(gen.length[r, 0])
        toks = [int(t) for t in np.asarray(gen.tokens[r, 0, :n]) if t != tok.eos_id]
        text = normalize_title(tok.decode(toks))
        assert row["generated"] == text
        assert row["oov"] == (text not in {normalize_title(t) for t in TITLES})
        q = _embed_one(config, params, tok, text)
        d = np.sqrt(((ref_emb - q) ** 2).sum(1))
        order = np.argsort(d, kind="stable")
        np.testing.assert_allclose(row["distances"], d[order], rtol=1e-3, atol=1e-4)
        assert row["ranked_ids"] == [catalog.ids[j] for j in order] or np.allclose(
            d[order], d[[catalog.ids.index(i) for i in row["ranked_ids"]]], atol=1e-4)
        # duplicate titles have equal embeddings and stay adjacent in id order
        pos = [row["ranked_ids"].index(i) for i in (11, 12)]
        assert pos[1] == pos[0] + 1


def test_l2_rank_ties_keep_item_order():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 5.0]], np.float32)
    order, d2 = grounding.l2_rank(np.array([[1.0, 0.1]], np.float32), items, top=3)
    assert order[0].tolist() == [0, 2, 1]
    np.testing.assert_allclose(d2[0], [0.01, 0.01, 1.81], atol=1e-5)
