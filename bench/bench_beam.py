"""Constrained beam search: our jitted search vs transformers generate + a Python prefix trie.

The D3 / LatentR³ release evaluates with `generate(num_beams=10, num_return_sequences=10,
prefix_allowed_tokens_fn=...)`, where the function walks a Python dict trie for every beam
at every step. This benchmark runs both on the same model (SPEC.md section 9 small config,
random weights, converted to a transformers Qwen2 model), the same catalog (real CDs if
../shared is present, else a synthetic one) and the same left-padded user prompts, in
float32 and bfloat16, and reports users/s, the ratio, and whether both return the same
top-10 titles in the same order.

    python bench/bench_beam.py [--users 16] [--batch 8] [--dtypes float32,bfloat16]

On a GPU both engines run there (torch's trie walk stays in Python, as in the release).
The catalog and tokenizer can be cached to a file made where ../shared is, and carried:
    python bench/bench_beam.py --data-cache bench_data/beam_data.pkl --users 0   # make it
    python bench/bench_beam.py --data-cache bench_data/beam_data.pkl --shape qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # puts the repository root on sys.path
from latentr3_jax import data as D
from latentr3_jax.data.synthetic import generate
from latentr3_jax.decode.beam import constrained_beam_search
from latentr3_jax.decode.trie import ItemTrie
from latentr3_jax.hf import save_pretrained
from latentr3_jax.model import decoder, latent
from latentr3_jax.model.config import bench_config


def load_data(vocab_size: int, cache: str = ""):
    """(dataset, tokenizer, source); with `cache`, read from that pickle when it exists,
    else build and write it."""
    if cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            return pickle.load(f)
    out = _build_data(vocab_size)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        with open(cache, "wb") as f:
            pickle.dump(out, f)
    return out


def _build_data(vocab_size: int):
    if common.have_cds():
        ds = D.read_d3(common.CDS)
        source = "CDs_and_Vinyl"
    else:
        catalog, splits, _ = generate(num_items=3000, num_users=2000, seed=0)
        ds = D.Dataset(name="synthetic", category_word="musics", catalog=catalog, splits=splits)
        source = "synthetic (3000 items)"
    tok = D.train_tokenizer(D.tokenizer_corpus(ds), vocab_size)
    return ds, tok, source


def make_batches(tok, ds, users: int, batch: int):
    enc = D.encode_split(tok, ds.splits["test"][:users], ds.category_word)
    width = -(-max(len(e.prompt_ids) for e in enc) // 16) * 16
    batches = []
    for s in range(0, users, batch):
        chunk = enc[s:s + batch]
        ids = np.full((len(chunk), width), tok.pad_id, np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for r, e in enumerate(chunk):
            ids[r, width - len(e.prompt_ids):] = e.prompt_ids
            mask[r, width - len(e.prompt_ids):] = 1
        batches.append((ids, mask))
    return batches, width, float(np.mean([len(e.prompt_ids) for e in enc]))


def run_jax(config, params, trie, batches, dtype, num_beams, length_penalty, num_thoughts):
    arrays = jax.device_put(trie.arrays())
    call = lambda ids, mask: constrained_beam_search(
        config, params, arrays, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
        max_len=trie.max_len, num_beams=num_beams, length_penalty=length_penalty,
        num_thoughts=num_thoughts, dtype=dtype)
    t = time.perf_counter()
    jax.block_until_ready(call(*batches[0]))
    compile_s = time.perf_counter() - t
    leaves = []
    elapsed = sum(common.time_steps(lambda i: leaves.append(np.asarray(call(*batches[i]).leaf)),
                                    len(batches)))
    return np.concatenate(leaves), _users(batches) / elapsed, compile_s


def run_torch(model_dir, trie, batches, torch_dtype, num_beams, length_penalty, eos_id, pad_id):
    import torch  # optional, heavy: only the torch side needs it
    from transformers import Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    width = batches[0][0].shape[1]
    children = [trie.children(n) for n in range(trie.num_nodes)]

    def allowed(batch_id, input_ids):      # the D3 way: walk a Python trie from the root
        node = 0
        for t in input_ids[width:].tolist():
            node = children[node].get(t, -1)
            if node < 0:
                return [eos_id]
        return list(children[node]) or [eos_id]

    def decode_leaves(seqs):
        out = []
        for seq in seqs.tolist():
            gen = seq[width:]
            if eos_id in gen:
                gen = gen[:gen.index(eos_id) + 1]
            node = trie.walk(gen)
            out.append(int(trie.leaf_index[node]) if node >= 0 else -1)
        return out

    def generate(ids, mask):
        return model.generate(input_ids=torch.as_tensor(ids, device=device),
                              attention_mask=torch.as_tensor(mask, device=device),
                              num_beams=num_beams, num_return_sequences=num_beams,
                              max_new_tokens=trie.max_len, length_penalty=length_penalty,
                              do_sample=False, prefix_allowed_tokens_fn=allowed,
                              eos_token_id=eos_id, pad_token_id=pad_id)

    def run(i):
        ids, mask = batches[i]
        leaves.append(np.array(decode_leaves(generate(ids, mask))).reshape(ids.shape[0], num_beams))

    leaves = []
    with torch.inference_mode():   # warm-up (JAX's compile is not timed either): on a GPU,
        generate(*batches[0])      # each new length builds a cuDNN attention plan once
        elapsed = sum(common.time_steps(run, len(batches)))
    return np.concatenate(leaves), _users(batches) / elapsed


def _users(batches) -> int:
    return sum(ids.shape[0] for ids, _ in batches)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    same_order = float(np.mean([list(x) == list(y) for x, y in zip(a, b)]))
    same_set = float(np.mean([set(x) == set(y) for x, y in zip(a, b)]))
    top1 = float(np.mean(a[:, 0] == b[:, 0]))
    overlap = float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))
    return {"same_top10_order": same_order, "same_top10_set": same_set, "same_top1": top1,
            "top10_overlap": overlap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--std", type=float, default=0.02, help="init std of the random weights")
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "beam.json"))
    ap.add_argument("--data-cache", default="", help="pickle of the catalog and tokenizer")
    ap.add_argument("--shape", default="small", choices=("small", "qwen2.5-1.5b"))
    args = ap.parse_args(argv)

    import torch  # optional, heavy: imported once the arguments are known to be good
    if not torch.cuda.is_available():
        torch.set_num_threads(2)

    ds, tok, source = load_data(args.vocab, args.data_cache)
    if args.users <= 0:
        print(f"wrote {args.data_cache}")
        return 0
    shape = {} if args.shape == "small" else dict(
        hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
        vocab_size=151936)
    config = bench_config(**{"vocab_size": tok.vocab_size, **shape}, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = decoder.init_params(config, k1, std=args.std)
    params["latent"] = latent.init_latent_params(config, k2)
    trie = ItemTrie(D.catalog_target_ids(tok, ds.catalog, "latentr3"), config.vocab_size)
    batches, width, mean_prompt = make_batches(tok, ds, args.users, args.batch)
    print(f"catalog {source}: {len(ds.catalog)} items, {trie.num_leaves} distinct titles, "
          f"{trie.num_nodes} trie nodes, longest title {trie.max_len} tokens; "
          f"{args.users} users, batch {args.batch}, prompts {mean_prompt:.0f} tokens "
          f"(padded {width}); model {config.num_params() / 1e6:.1f}M params; jax {jax.devices()[0].platform}")

    model_dir = tempfile.mkdtemp(prefix="bench_beam_")
    save_pretrained(config, {k: v for k, v in params.items() if k != "latent"}, model_dir)

    rows = []
    for name in args.dtypes.split(","):
        jdt, tdt = common.jax_dtype(name), common.torch_dtype(name)
        ours, ours_ups, compile_s = run_jax(config, params, trie, batches, jdt, args.num_beams,
                                            args.length_penalty, 0)
        _, latent_ups, _ = run_jax(config, params, trie, batches, jdt, args.num_beams,
                                   args.length_penalty, 1)
        ref, ref_ups = run_torch(model_dir, trie, batches, tdt, args.num_beams,
                                 args.length_penalty, tok.eos_id, tok.pad_id)
        row = {"dtype": name, "jax_users_per_s": ours_ups, "jax_latent1_users_per_s": latent_ups,
               "jax_compile_s": compile_s, "torch_users_per_s": ref_ups,
               "speedup": ours_ups / ref_ups, **compare(ours, ref)}
        rows.append(row)
        print(f"  {name}: done", flush=True)

    hdr = (f"{'dtype':<9} {'jax u/s':>8} {'jax N=1':>8} {'torch u/s':>9} {'ratio':>6} "
           f"{'top10 order':>11} {'top10 set':>9} {'top1':>5} {'overlap':>7} {'compile s':>9}")
    print(hdr)
    for r in rows:
        print(f"{r['dtype']:<9} {r['jax_users_per_s']:8.2f} {r['jax_latent1_users_per_s']:8.2f} "
              f"{r['torch_users_per_s']:9.2f} {r['speedup']:6.1f} {r['same_top10_order']:11.2f} "
              f"{r['same_top10_set']:9.2f} {r['same_top1']:5.2f} {r['top10_overlap']:7.2f} "
              f"{r['jax_compile_s']:9.1f}")
    result = {"catalog": source, "items": len(ds.catalog), "distinct_titles": trie.num_leaves,
              "trie_nodes": trie.num_nodes, "max_title_tokens": trie.max_len,
              "users": args.users, "batch": args.batch, "num_beams": args.num_beams,
              "length_penalty": args.length_penalty, "prompt_tokens_mean": mean_prompt,
              "prompt_width": width, "model": config.to_dict(), "init_std": args.std,
              "torch_threads": torch.get_num_threads(), "machine": common.machine(), "rows": rows}
    common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
