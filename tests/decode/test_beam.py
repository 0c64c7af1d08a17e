"""Constrained beam search vs brute-force scoring of every catalog title."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _eval_helpers import random_params
from latentr3_jax.decode.beam import constrained_beam_search, decode_cache_buckets, free_generate
from latentr3_jax.decode.trie import ItemTrie
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import tiny_config

EOS = 2
V = 48


def _model(seed=0):
    config = tiny_config(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, eos_token_id=EOS)
    params = random_params(config, seed, std=0.35, latent_std=0.3)  # peaky logits: few ties
    return config, params


def _catalog(seed=0):
    rng = np.random.default_rng(seed)
    cat, i = {}, 0
    for _ in range(8):                      # groups sharing a first token
        head = [int(rng.integers(3, 40))]
        for _ in range(int(rng.integers(1, 4))):
            seq = head + list(rng.integers(3, 40, size=rng.integers(0, 4))) + [EOS]
            cat[i] = [int(t) for t in seq]
            i += 1
    cat[i], cat[i + 1] = list(cat[0]), list(cat[3])   # duplicate titles
    return cat


def _prompts(seed=0, lengths=(7, 4, 6)):
    rng = np.random.default_rng(seed + 1)
    P = max(lengths)
    ids = np.zeros((len(lengths), P), np.int32)
    mask = np.zeros((len(lengths), P), np.int32)
    for r, n in enumerate(lengths):
        ids[r, P - n:] = rng.integers(3, V - 1, size=n)
        mask[r, P - n:] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _title_logprobs(config, params, p_ids, p_mask, tgt, tmask, num_thoughts):
    """Full-pass (the release's way) log-prob of every target token [rows, T]."""
    if num_thoughts:
        logits = latent.reference_forward(config, params, p_ids, p_mask, tgt, tmask,
                                          thought_id=V - 1, num_thoughts=num_thoughts)
    else:
        logits = decoder.apply(config, params, jnp.concatenate([p_ids, tgt], 1),
                               attention_mask=jnp.concatenate([p_mask, tmask], 1))[0]
        logits = logits[:, p_ids.shape[1] - 1:-1]
    return latent.target_logprobs(logits, tgt) * tmask


def _brute_force(config, params, trie, ids, mask, num_thoughts, length_penalty):
    """Score [users, leaves] of every distinct title, and per-user edge log-probs."""
    U, L, T = ids.shape[0], trie.num_leaves, trie.max_len
    tgt = np.zeros((L, T), np.int32)
    tmask = np.zeros((L, T), np.int32)
    for j, seq in enumerate(trie.leaf_tokens):
        tgt[j, :len(seq)] = seq
        tmask[j, :len(seq)] = 1
    lp = np.asarray(_title_logprobs(config, params, jnp.repeat(ids, L, 0), jnp.repeat(mask, L, 0),
                                    jnp.asarray(np.tile(tgt, (U, 1))),
                                    jnp.asarray(np.tile(tmask, (U, 1))), num_thoughts))
    lp = lp.reshape(U, L, T)
    scores = lp.sum(-1) / tmask.sum(1) ** length_penalty
    edges = []
    for u in range(U):
        e = {}
        for j, seq in enumerate(trie.leaf_tokens):
            node = 0
            for i, tok in enumerate(seq):
                e[(node, tok)] = lp[u, j, i]
                node = trie.children(node)[tok]
        edges.append(e)
    return scores, edges


def _reference_beam(trie, edge_lp, B, length_penalty):
    """Plain-Python beam search with Hugging Face's rules, on brute-force edge log-probs."""
    running, finished, t = [(0.0, 0)], [], 0
    while running and t < trie.max_len:
        cands = sorted(((s + edge_lp[(n, tok)], c) for s, n in running
                        for tok, c in trie.children(n).items()), key=lambda x: -x[0])[:2 * B]
        for i, (s, c) in enumerate(cands):
            if i < B and trie.leaf_index[c] >= 0:
                finished.append((s / (t + 1) ** length_penalty, int(trie.leaf_index[c])))
        finished = sorted(finished, key=lambda x: -x[0])[:B]
        running = [x for x in cands if trie.leaf_index[x[1]] < 0][:B]
        t += 1
        if len(finished) == B and running and running[0][0] / t ** length_penalty <= finished[-1][0]:
            break
    return finished


def _assert_same_order(got_leaves, got_scores, ref_scores_by_leaf):
    """Same scores per title; same order wherever neighbouring scores are not near-ties."""
    np.testing.assert_allclose(got_scores, ref_scores_by_leaf[got_leaves], atol=2e-4, rtol=1e-5)
    gaps = -np.diff(got_scores)
    assert np.all(gaps >= -1e-6)


def _buckets(kind, max_len):
    """The decode cache's stages: the default, one stage of max_len, or a new stage every
    step or two (1, 2, 4, ...: every stage boundary and the cond that skips a stage run)."""
    return {"default": None, "whole": (max_len,),
            "every": decode_cache_buckets(max_len, first=1)}[kind]


@pytest.mark.parametrize("num_thoughts,length_penalty,buckets",
                         [(0, 0.0, "default"), (1, 1.0, "default"), (2, 0.5, "default"),
                          (0, 0.0, "every"), (1, 1.0, "every"), (1, 1.0, "whole")])
def test_wide_beam_equals_brute_force(num_thoughts, length_penalty, buckets):
    """With B >= distinct titles the search is exhaustive: the full brute-force ranking."""
    config, params = _model()
    trie = ItemTrie(_catalog(), V, width=3)
    ids, mask = _prompts()
    B = trie.num_leaves + 2
    res = constrained_beam_search(config, params, trie.arrays(), ids, mask, max_len=trie.max_len,
                                  num_beams=B, length_penalty=length_penalty,
                                  num_thoughts=num_thoughts,
                                  cache_buckets=_buckets(buckets, trie.max_len))
    bf, _ = _brute_force(config, params, trie, ids, mask, num_thoughts, length_penalty)
    leaf, scores, valid = map(np.asarray, (res.leaf, res.scores, res.valid))
    for u in range(ids.shape[0]):
        assert valid[u].sum() == trie.num_leaves
        got = leaf[u][valid[u]]
        assert sorted(got) == list(range(trie.num_leaves))
        _assert_same_order(got, scores[u][valid[u]], bf[u])
        order = np.argsort(-bf[u], kind="stable")
        gaps = np.diff(-bf[u][order])
        clear = np.concatenate([[True], gaps > 1e-3]) & np.concatenate([gaps > 1e-3, [True]])
        np.testing.assert_array_equal(got[clear], order[clear])
        for k, j in enumerate(got):   # returned tokens spell the title
            n = int(res.length[u, k])
            assert tuple(np.asarray(res.tokens[u, k, :n])) == trie.leaf_tokens[j]


@pytest.mark.parametrize("length_penalty,buckets", [(0.0, "default"), (1.0, "default"),
                                                    (1.0, "every")])
def test_narrow_beam_matches_reference_search(length_penalty, buckets):
    """With B < titles: same hypotheses as an HF-rule Python beam search; top-1 = brute force
    whenever the brute-force winner survives the pruning with a clear margin."""
    config, params = _model(seed=1)
    trie = ItemTrie(_catalog(seed=1), V)
    ids, mask = _prompts(seed=1, lengths=(7, 3, 5, 7, 6, 2))
    B = 4
    res = constrained_beam_search(config, params, trie.arrays(), ids, mask, max_len=trie.max_len,
                                  num_beams=B, length_penalty=length_penalty, num_thoughts=1,
                                  cache_buckets=_buckets(buckets, trie.max_len))
    bf, edges = _brute_force(config, params, trie, ids, mask, 1, length_penalty)
    leaf, scores, valid = map(np.asarray, (res.leaf, res.scores, res.valid))
    agree = 0
    for u in range(ids.shape[0]):
        ref = _reference_beam(trie, edges[u], B, length_penalty)
        assert valid[u].all() and len(set(leaf[u])) == B
        _assert_same_order(leaf[u], scores[u], bf[u])
        ref_leaves = [j for _, j in ref]
        ref_scores = np.array([s for s, _ in ref])
        clear = np.concatenate([[True], -np.diff(ref_scores) > 1e-3])
        clear &= np.concatenate([-np.diff(ref_scores) > 1e-3, [True]])
        np.testing.assert_array_equal(leaf[u][clear], np.array(ref_leaves)[clear])
        top2 = np.sort(bf[u])[::-1][:2]
        if top2[0] - top2[1] > 0.1 and int(np.argmax(bf[u])) in ref_leaves:
            assert leaf[u, 0] == int(np.argmax(bf[u]))
            agree += 1
    assert agree >= 2


@pytest.mark.parametrize("buckets", ["default", "every"])
def test_free_generate_greedy_matches_argmax_loop(buckets):
    config, params = _model(seed=2)
    ids, mask = _prompts(seed=2)
    res = free_generate(config, params, ids, mask, max_len=6, eos_id=EOS, num_beams=1,
                        cache_buckets=_buckets(buckets, 6))
    width = ids.shape[1] + 6
    for u in range(ids.shape[0]):
        seq = list(np.asarray(ids[u][mask[u] > 0]))
        out = []
        for _ in range(6):   # right-padded to one width: causal logits are unaffected
            padded = np.zeros((1, width), np.int32)
            padded[0, :len(seq)] = seq
            lg = decoder.logits(config, params, jnp.asarray(padded))
            nxt = int(jnp.argmax(lg[0, len(seq) - 1]))
            out.append(nxt)
            seq.append(nxt)
            if nxt == EOS:
                break
        n = int(res.length[u, 0])
        assert list(np.asarray(res.tokens[u, 0, :n])) == out


def test_matches_transformers_generate_with_prefix_trie(tmp_path):
    """Same hypotheses, order and scores as HF beam search with a prefix_allowed_tokens_fn."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from latentr3_jax.hf import save_pretrained

    config, params = _model(seed=3)
    config = config.replace(pad_token_id=0)
    save_pretrained(config, {k: v for k, v in params.items() if k != "latent"}, str(tmp_path))
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    trie = ItemTrie(_catalog(seed=3), V)
    ids, mask = _prompts(seed=3, lengths=(7, 4, 6, 5))
    B, width = 4, ids.shape[1]

    def allowed(_, input_ids):
        node = trie.walk(input_ids[width:].tolist())
        return (list(trie.children(node)) if node >= 0 else []) or [EOS]

    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                             attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                             num_beams=B, num_return_sequences=B, max_new_tokens=trie.max_len,
                             length_penalty=1.0, do_sample=False, prefix_allowed_tokens_fn=allowed,
                             eos_token_id=EOS, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    hf_leaves, hf_scores = [], np.asarray(out.sequences_scores).reshape(-1, B)
    for seq in out.sequences.tolist():
        gen = seq[width:]
        gen = gen[:gen.index(EOS) + 1]
        hf_leaves.append(int(trie.leaf_index[trie.walk(gen)]))
    hf_leaves = np.array(hf_leaves).reshape(-1, B)
    res = constrained_beam_search(config, params, trie.arrays(), ids, mask, max_len=trie.max_len,
                                  num_beams=B, length_penalty=1.0)
    np.testing.assert_array_equal(np.asarray(res.leaf), hf_leaves)
    np.testing.assert_allclose(np.asarray(res.scores), hf_scores, atol=1e-4)


def _shifted(params, offset):
    """LatentRATT's output moved by `offset`: softmax weights sum to 1, so adding it to V's
    bias adds it to the latent exactly (an independent way to perturb the thought slot)."""
    p = jax.tree.map(lambda x: x, params)
    p["latent"] = dict(p["latent"])
    p["latent"]["v"] = dict(p["latent"]["v"], bias=p["latent"]["v"]["bias"] + offset)
    return p


def _combine_reference(per_sample, B, combine):
    """per_sample: one list of (score, leaf) per sample -> the B best (score, leaf)."""
    M = len(per_sample)
    leaves = {j for res in per_sample for _, j in res}
    merged = []
    for j in leaves:
        got = [s for res in per_sample for s, jj in res if jj == j]
        if combine == "max":
            merged.append((max(got), j))
        else:
            merged.append((float(np.log(np.sum(np.exp(np.array(got, np.float64))) / M)), j))
    return sorted(merged, key=lambda x: -x[0])[:B]


@pytest.mark.parametrize("combine", ["logmeanexp", "max"])
def test_latent_ensemble_equals_separate_searches_combined(combine):
    """M latents r + noise_m in one search equal M separate searches (the noise put in
    LatentRATT's V bias instead), each checked against the HF-rule reference search on
    brute-force edge log-probs, merged per title by the same rule in plain Python."""
    from latentr3_jax.decode.beam import latent_sample_noise
    config, params = _model(seed=2)
    trie = ItemTrie(_catalog(seed=2), V)
    ids, mask = _prompts(seed=2, lengths=(7, 3, 5, 6))
    B, M, sigma, lp = 4, 3, 0.8, 1.0
    res = constrained_beam_search(config, params, trie.arrays(), ids, mask, max_len=trie.max_len,
                                  num_beams=B, length_penalty=lp, num_thoughts=1,
                                  latent_samples=M, latent_sigma=sigma, latent_combine=combine)
    noise = np.asarray(latent_sample_noise(config.hidden_size, M, sigma))
    assert np.all(noise[0] == 0) and np.abs(noise[1:]).mean() > 0.3
    per_sample = []
    for m in range(M):
        _, edges = _brute_force(config, _shifted(params, noise[m]), trie, ids, mask, 1, lp)
        per_sample.append([_reference_beam(trie, edges[u], B, lp) for u in range(ids.shape[0])])
    # the noise matters: some user's sample searches return different titles or orders
    assert any([j for _, j in per_sample[0][u]] != [j for _, j in per_sample[m][u]]
               for u in range(ids.shape[0]) for m in range(1, M))
    leaf, scores, valid = map(np.asarray, (res.leaf, res.scores, res.valid))
    for u in range(ids.shape[0]):
        ref = _combine_reference([per_sample[m][u] for m in range(M)], B, combine)
        assert valid[u].sum() == len(ref) and len(set(leaf[u][valid[u]])) == len(ref)
        ref_scores = np.array([s for s, _ in ref])
        np.testing.assert_allclose(scores[u][valid[u]], ref_scores, atol=2e-4, rtol=1e-5)
        clear = np.concatenate([[True], -np.diff(ref_scores) > 1e-3])
        clear &= np.concatenate([-np.diff(ref_scores) > 1e-3, [True]])
        np.testing.assert_array_equal(leaf[u][valid[u]][clear], np.array([j for _, j in ref])[clear])
        for k in np.flatnonzero(valid[u]):   # returned tokens spell the title
            n = int(res.length[u, k])
            assert tuple(np.asarray(res.tokens[u, k, :n])) == trie.leaf_tokens[leaf[u, k]]


def test_latent_ensemble_without_noise_is_the_plain_search():
    config, params = _model(seed=3)
    trie = ItemTrie(_catalog(seed=3), V)
    ids, mask = _prompts(seed=3)
    kw = dict(max_len=trie.max_len, num_beams=5, num_thoughts=1)
    one = constrained_beam_search(config, params, trie.arrays(), ids, mask, **kw)
    same = constrained_beam_search(config, params, trie.arrays(), ids, mask, latent_samples=4,
                                   latent_sigma=0.0, **kw)
    np.testing.assert_array_equal(np.asarray(one.leaf), np.asarray(same.leaf))
    np.testing.assert_allclose(np.asarray(one.scores), np.asarray(same.scores), atol=1e-5)
    with pytest.raises(ValueError, match="latent thoughts"):
        constrained_beam_search(config, params, trie.arrays(), ids, mask, max_len=trie.max_len,
                                num_beams=5, num_thoughts=0, latent_samples=2, latent_sigma=1.0)


def test_matmul_weights_cast_once_changes_nothing_in_bf16(monkeypatch):
    """Beam search casts the matmul weights to bf16 once before its decode loop and, on a
    CPU, holds weights and caches as uint16 bits; the search must return bit for bit what
    it returns when every step casts the weights itself and no bits are used."""
    config, params = _model(seed=4)
    cast = decoder.matmul_weights(params, jnp.bfloat16)
    assert decoder.matmul_weights(params, jnp.float32) is params
    flat = jax.tree_util.tree_flatten_with_path(cast)[0]
    kinds = {getattr(p[-1], "key", None): x.dtype for p, x in flat}
    assert kinds["kernel"] == jnp.bfloat16 and kinds["embedding"] == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for p, x in flat
               if getattr(p[-1], "key", None) not in ("kernel", "embedding"))
    trie = ItemTrie(_catalog(seed=4), V)
    ids, mask = _prompts(seed=4)
    kw = dict(max_len=trie.max_len, num_beams=4, num_thoughts=1, dtype=jnp.bfloat16)
    once = constrained_beam_search(config, params, trie.arrays(), ids, mask, **kw)
    monkeypatch.setattr(decoder, "matmul_weights", lambda p, dtype: p)
    jax.clear_caches()
    every_step = constrained_beam_search(config, params, trie.arrays(), ids, mask, **kw)
    monkeypatch.setattr(decoder, "to_bits", lambda tree: tree)
    jax.clear_caches()
    no_bits = constrained_beam_search(config, params, trie.arrays(), ids, mask, **kw)
    jax.clear_caches()
    for other in (every_step, no_bits):
        for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bits_round_trip_and_stay_off_accelerators(monkeypatch):
    tree = {"w": jnp.asarray([1.5, -2.25, 3e-3], jnp.bfloat16), "s": jnp.ones(2, jnp.float32),
            "i": jnp.arange(3)}
    bits = decoder.to_bits(tree)
    assert bits["w"].dtype == jnp.uint16 and bits["s"].dtype == jnp.float32
    assert bits["i"].dtype == tree["i"].dtype
    back = decoder.from_bits(bits, jnp.bfloat16)
    for k in tree:
        assert back[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(np.asarray(back[k], np.float32),
                                      np.asarray(tree[k], np.float32))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert decoder.to_bits(tree) is tree


@pytest.mark.parametrize("dtype,samples", [(jnp.float32, 1), (jnp.bfloat16, 1), (jnp.float32, 3)])
def test_cache_stages_change_no_ranking(dtype, samples):
    """Titles of up to 40 tokens, so the default stages (16, 32, 40) all run for some users
    and are skipped for others: same titles, same order and the same scores (up to
    rounding: a stage's attention sums fewer masked slots) as one cache of 40 slots."""
    rng = np.random.default_rng(5)
    cat = {}
    for i in range(12):
        n = int(rng.integers(1, 40)) if i % 3 else int(rng.integers(14, 40))
        cat[i] = [int(t) for t in rng.integers(3, 40, size=n)] + [EOS]
    config, params = _model(seed=5)
    trie = ItemTrie(cat, V)
    assert len(decode_cache_buckets(trie.max_len)) == 3   # 16, 32, the longest title
    ids, mask = _prompts(seed=5, lengths=(7, 4, 6, 5))
    kw = dict(max_len=trie.max_len, num_beams=6, num_thoughts=1, dtype=dtype,
              latent_samples=samples, latent_sigma=0.5 if samples > 1 else 0.0)
    staged = constrained_beam_search(config, params, trie.arrays(), ids, mask, **kw)
    whole = constrained_beam_search(config, params, trie.arrays(), ids, mask,
                                    cache_buckets=[trie.max_len], **kw)   # a list is taken too
    assert int(np.asarray(staged.length).max()) > 16   # some search ran past the first stage
    np.testing.assert_array_equal(np.asarray(staged.leaf), np.asarray(whole.leaf))
    np.testing.assert_array_equal(np.asarray(staged.length), np.asarray(whole.length))
    np.testing.assert_array_equal(np.asarray(staged.tokens), np.asarray(whole.tokens))
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(staged.scores), np.asarray(whole.scores), atol=tol)


def test_cache_buckets_are_checked():
    assert decode_cache_buckets(104) == (16, 32, 64, 104)
    assert decode_cache_buckets(16) == (16,) and decode_cache_buckets(5) == (5,)
    assert decode_cache_buckets(9, first=4) == (4, 8, 9)
    config, params = _model()
    trie = ItemTrie(_catalog(), V)
    ids, mask = _prompts()
    for bad in [(2, trie.max_len + 1), [3, 2, trie.max_len], (0, trie.max_len), ()]:
        with pytest.raises(ValueError, match="cache_buckets"):
            constrained_beam_search(config, params, trie.arrays(), ids, mask,
                                    max_len=trie.max_len, num_beams=3, cache_buckets=bad)
