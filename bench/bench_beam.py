"""Constrained beam search: our jitted search vs the release's transformers `generate`.

The release evaluates with `generate(num_beams=10, num_return_sequences=10)` and its own
logits processor: after a log-softmax, every beam of every step looks up its generated
ids, joined into a string key, in a dict of allowed next ids, one beam at a time in
Python, and all other ids get -1e6. Its model is the latent model, whose prefill runs two
full passes over the beam-expanded prompt batch. The rows, on the same model, catalog and
left-padded user prompts, in float32 and bfloat16:

  N=0  jax        our search, no latent (prompt once per user into the KV cache)
       torch      `generate` + the release's processor (torch_reference.ReleaseTrieProcessor)
       torch/hf   `generate` + transformers' own `prefix_allowed_tokens_fn` walking a
                  Python trie (the D3 code's way)
  N=1  jax        our search with one latent thought
       torch      the release's latent model (torch_reference.latent_generation_model)
                  + its processor
  jax0_whole, jax1_whole: our search with the decode cache sized to the longest title
       from the first step (`cache_buckets=(max_len,)`, one stage) instead of the default
       stages 16, 32, 64, ...: what the staged cache saves

Each row gives users/s, the FLOPs of the passes it runs (bench/common.py: the decode
steps are the longest returned title of each batch, EOS included), FLOP/s and fraction
of peak (CPU: a matmul measured in this process; GPU: the datasheet), and whether the
engines return the same top-10 titles in the same order. float32 is true float32 in
both engines (common.jax_precision, torch TF32 off); bfloat16 casts the torch model, as
the release loads it, and runs JAX with bf16 matmuls.

Weights: random for the small and qwen2.5-1.5b shapes (almost every title then runs to
the catalog's longest length). `--shape smollm2-135m` uses SmolLM2-135M-Instruct's real
weights and tokenizer from ../shared/models (skipped with a message when absent, unless
`--weights random`); `--finetune-steps K` first trains K LatentR³ SFT steps on CDs train
rows so that titles end where real ones do; with K = 0 the rows say the weights are
pretrained, not fine-tuned.

    python bench/bench_beam.py [--users 16] [--batch 8] [--dtypes float32,bfloat16]
    python bench/bench_beam.py --shape smollm2-135m --finetune-steps 30

On a GPU both engines run there (the release's per-beam lookups stay in Python, as in the
release). The catalog and tokenizer can be cached to a file made where ../shared is, and
carried:
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
from latentr3_jax.hf import load_pretrained, resize_vocab, save_pretrained
from latentr3_jax.model import decoder, latent
from latentr3_jax.train import setup

HEAD_LEN = 5   # the release keys a title's first token by the 5 ids before generation


# --------------------------------------------------------------------------- data


def load_data(vocab_size: int, cache: str = "", tokenizer: str = "bpe"):
    """(dataset, tokenizer, source); with `cache`, read from that pickle when it exists
    (and was made with the same tokenizer), else build and write it."""
    if cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            out = pickle.load(f)
        if len(out) == 3 and tokenizer == "bpe":      # a cache from before the tokenizer choice
            return out
        if len(out) == 4 and out[3] == tokenizer:
            return out[:3]
        raise SystemExit(f"{cache} holds another tokenizer's data; pass another --data-cache")
    out = _build_data(vocab_size, tokenizer)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        with open(cache, "wb") as f:
            pickle.dump((*out, tokenizer), f)
    return out


def _build_data(vocab_size: int, tokenizer: str):
    if common.have_cds():
        ds = D.read_d3(common.CDS)
        source = "CDs_and_Vinyl"
    else:
        catalog, splits, _ = generate(num_items=3000, num_users=2000, seed=0)
        ds = D.Dataset(name="synthetic", category_word="musics", catalog=catalog, splits=splits)
        source = "synthetic (3000 items)"
    if tokenizer == "smollm2":
        tok = common.smollm2_tokenizer()
    else:
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


def with_thought(batches, thought_id: int):
    """The prompts as the release's latent model reads them: <|Thought|> appended."""
    out = []
    for ids, mask in batches:
        col = np.full((ids.shape[0], 1), thought_id, ids.dtype)
        out.append((np.concatenate([ids, col], 1), np.concatenate([mask, np.ones_like(col)], 1)))
    return out


# --------------------------------------------------------------------------- model


def build_model(args, tok):
    """(config, params incl. 'latent', description of the weights)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    ids = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if args.shape == "smollm2-135m" and args.weights != "random":
        config, params = load_pretrained(common.SMOLLM2_GGUF)
        config, params = resize_vocab(config, params, tok.vocab_size - config.vocab_size)
        config = config.replace(**ids)
        params = jax.tree.map(jnp.asarray, params)
        how = "SmolLM2-135M-Instruct (../shared/models GGUF, Q4_1 dequantised), pretrained"
    else:
        config = common.shape_config(args.shape, tok.vocab_size).replace(**ids)
        params = decoder.init_params(config, k1, std=args.std)
        how = f"random (normal, std {args.std})"
    params = dict(params)
    params["latent"] = latent.init_latent_params(config, k2)
    return config, params, how


def finetune(config, params, tok, ds, steps: int, batch: int, lr: float):
    """`steps` LatentR³ SFT steps (N = 1, float32, AdamW, constant `lr` after 2 warm-up
    steps) on CDs train rows in file order; returns (params, losses)."""
    from latentr3_jax.model import latent as latent_lib
    from latentr3_jax.parallel import make_mesh
    from latentr3_jax.train import optim, state as state_lib
    from latentr3_jax.train.loop import DEVICE_KEYS
    from latentr3_jax.train.sft import make_sft_loss
    from latentr3_jax.train.step import TrainStep

    enc = D.encode_split(tok, ds.splits["train"][:steps * batch], ds.category_word,
                         max_target_len=64)
    it = D.BatchIterator(enc, batch, buckets=(128, 192, 256, 384, 512), target_buckets=(16, 32, 64),
                         pad_id=tok.pad_id, seed=0, shuffle=True, drop_last=True,
                         process_index=0, process_count=1)
    sched = optim.linear_warmup_decay(lr, 2, 10 ** 6)
    tx = optim.adamw(sched, grad_clip=1.0)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    config_x = config.with_execution(scan_layers=True)
    state, sh = state_lib.create_sharded_state(None, latent_lib.model_param_axes(config), tx,
                                               jax.random.PRNGKey(1), mesh, params=params)
    step = TrainStep(make_sft_loss(config_x, num_thoughts=1), tx, mesh, sh, schedule=sched)
    losses = []
    with common.jax_precision("float32"):
        for i, b in enumerate(it.epoch(0)):
            if i >= steps:
                break
            state, m = step(state, {k: b[k] for k in DEVICE_KEYS if k in b})
            losses.append(float(m["loss"]))
            print(f"  fine-tune step {i + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    return jax.device_get(state.params), losses


# --------------------------------------------------------------------------- engines


def run_jax(config, params, trie, batches, dtype, num_beams, length_penalty, num_thoughts,
            cache_buckets=None):
    """(leaves [users, beams], users/s, compile seconds, decode steps per batch)."""
    arrays = jax.device_put(trie.arrays())
    call = lambda ids, mask: constrained_beam_search(
        config, params, arrays, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
        max_len=trie.max_len, num_beams=num_beams, length_penalty=length_penalty,
        num_thoughts=num_thoughts, dtype=dtype, cache_buckets=cache_buckets)
    t = time.perf_counter()
    jax.block_until_ready(call(*batches[0]))
    compile_s = time.perf_counter() - t
    leaves, steps = [], []

    def run(i):
        res = call(*batches[i])
        leaves.append(np.asarray(res.leaf))
        steps.append(int(np.asarray(res.length).max()))
    elapsed = sum(common.time_steps(run, len(batches)))
    return np.concatenate(leaves), _users(batches) / elapsed, compile_s, steps, elapsed


def run_torch(model, trie, batches, num_beams, length_penalty, eos_id, pad_id, way: str,
              titles=(), heads=()):
    """`way`: 'release' (the release's logits processor, its table built from `titles`,
    the catalog's ids with EOS, and `heads`, the prompts' last ids) or 'hf' (transformers'
    prefix_allowed_tokens_fn over a Python trie). (leaves, users/s, steps per batch, s)."""
    import torch  # optional, heavy: only the torch side needs it
    from transformers import LogitsProcessorList, TemperatureLogitsWarper
    import torch_reference as ref

    device = next(model.parameters()).device
    width = batches[0][0].shape[1]
    children = [trie.children(n) for n in range(trie.num_nodes)]
    table = ref.release_trie_table(titles, heads, HEAD_LEN) if way == "release" else None

    def allowed(batch_id, input_ids):      # the D3 way: walk a Python trie from the root
        node = 0
        for t in input_ids[width:].tolist():
            node = children[node].get(t, -1)
            if node < 0:
                return [eos_id]
        return list(children[node]) or [eos_id]

    def decode_leaves(seqs):
        out, longest = [], 0
        for seq in seqs.tolist():
            gen = seq[width:]
            if eos_id in gen:
                gen = gen[:gen.index(eos_id) + 1]
            longest = max(longest, len(gen))
            node = trie.walk(gen)
            out.append(int(trie.leaf_index[node]) if node >= 0 else -1)
        return out, longest

    def generate(ids, mask):
        kw = {}
        if way == "release":   # as its evaluation builds the list: temperature 1, then its processor
            kw["logits_processor"] = LogitsProcessorList([
                TemperatureLogitsWarper(temperature=1.0),
                ref.ReleaseTrieProcessor(table, num_beams, HEAD_LEN)])
        else:
            kw["prefix_allowed_tokens_fn"] = allowed
        return model.generate(input_ids=torch.as_tensor(ids, device=device),
                              attention_mask=torch.as_tensor(mask, device=device),
                              num_beams=num_beams, num_return_sequences=num_beams,
                              max_new_tokens=trie.max_len, length_penalty=length_penalty,
                              do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, **kw)

    leaves, steps = [], []

    def run(i):
        ids, mask = batches[i]
        found, longest = decode_leaves(generate(ids, mask))
        leaves.append(np.array(found).reshape(ids.shape[0], num_beams))
        steps.append(longest)

    with torch.inference_mode():   # warm-up (JAX's compile is not timed either): on a GPU,
        generate(*batches[0])      # each new length builds a cuDNN attention plan once
        elapsed = sum(common.time_steps(run, len(batches)))
    return np.concatenate(leaves), _users(batches) / elapsed, steps, elapsed


def _users(batches) -> int:
    return sum(ids.shape[0] for ids, _ in batches)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    same_order = float(np.mean([list(x) == list(y) for x, y in zip(a, b)]))
    same_set = float(np.mean([set(x) == set(y) for x, y in zip(a, b)]))
    top1 = float(np.mean(a[:, 0] == b[:, 0]))
    overlap = float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))
    return {"same_top10_order": same_order, "same_top10_set": same_set, "same_top1": top1,
            "top10_overlap": overlap}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--std", type=float, default=0.02, help="init std of the random weights")
    ap.add_argument("--out", default="", help="default bench/results/beam.json (beam_<shape>.json)")
    ap.add_argument("--data-cache", default="", help="pickle of the catalog and tokenizer")
    ap.add_argument("--shape", default="small", choices=sorted(common.SHAPES))
    ap.add_argument("--weights", default="auto", choices=("auto", "random"),
                    help="smollm2-135m: its real weights (auto) or random ones")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="LatentR³ SFT steps on CDs train rows before timing (real weights)")
    ap.add_argument("--finetune-batch", type=int, default=8)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--rows", default="jax0,jax0_whole,release0,hf0,jax1,jax1_whole,release1",
                    help="which rows to run (N=0: jax0, jax0_whole, release0, hf0; N=1: jax1, "
                         "jax1_whole, release1)")
    args = ap.parse_args(argv)
    real = args.shape == "smollm2-135m" and args.weights == "auto"
    if real and not common.have_smollm2():
        print(f"skipped: {common.smollm2_missing()} (--weights random times the shape alone)")
        return 0

    import torch  # optional, heavy: imported once the arguments are known to be good
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(2)
    common.torch_strict_fp32()

    tokenizer = "smollm2" if args.shape == "smollm2-135m" else "bpe"
    ds, tok, source = load_data(args.vocab, args.data_cache, tokenizer)
    if args.users <= 0:
        print(f"wrote {args.data_cache}")
        return 0
    config, params, weights = build_model(args, tok)
    losses = []
    if args.finetune_steps > 0:
        params, losses = finetune(config, params, tok, ds, args.finetune_steps,
                                  args.finetune_batch, args.finetune_lr)
        weights += (f", then {args.finetune_steps} LatentR³ SFT steps (N=1, batch "
                    f"{args.finetune_batch}, lr {args.finetune_lr:g}) on CDs train rows")
    elif real:
        weights += ", not fine-tuned (titles may not end where real ones do)"
    # the prompt pass as `latentr3 eval` runs it on this backend (model.scan_layers=auto)
    config = config.with_execution(scan_layers=setup.scan_layers_option("auto", config.num_layers))
    titles = D.catalog_target_ids(tok, ds.catalog, "latentr3")
    trie = ItemTrie(titles, config.vocab_size)
    batches, width, mean_prompt = make_batches(tok, ds, args.users, args.batch)
    latent_batches = with_thought(batches, tok.thought_id)
    jax_device = jax.devices()[0]
    print(f"catalog {source}: {len(ds.catalog)} items, {trie.num_leaves} distinct titles, "
          f"{trie.num_nodes} trie nodes, longest title {trie.max_len} tokens; "
          f"{args.users} users, batch {args.batch}, prompts {mean_prompt:.0f} tokens "
          f"(padded {width}); model {args.shape} {config.num_params() / 1e6:.1f}M params; "
          f"weights: {weights}; jax {jax_device.platform}, torch {device}")

    with tempfile.TemporaryDirectory(prefix="bench_beam_") as model_dir:   # the torch copy
        save_pretrained(config, {k: v for k, v in params.items() if k != "latent"}, model_dir)
        result = _run_rows(args, config, params, trie, titles, batches, latent_batches, width,
                           tok, model_dir, device)
    result.update({"catalog": source, "items": len(ds.catalog), "distinct_titles": trie.num_leaves,
                   "trie_nodes": trie.num_nodes, "max_title_tokens": trie.max_len,
                   "users": args.users, "batch": args.batch, "num_beams": args.num_beams,
                   "length_penalty": args.length_penalty, "prompt_tokens_mean": mean_prompt,
                   "prompt_width": width, "shape": args.shape, "model": config.to_dict(),
                   "scan_layers": bool(config.scan_layers),
                   "non_embedding_params": common.non_embedding_params(config),
                   "weights": weights, "finetune_losses": losses, "init_std": args.std,
                   "torch_threads": torch.get_num_threads(), "torch_device": device,
                   "machine": common.machine()})
    out = args.out or os.path.join(common.RESULTS, "beam.json" if args.shape == "small"
                                   else f"beam_{args.shape}.json")
    common.write_result(out, result)
    return 0


def _run_rows(args, config, params, trie, titles, batches, latent_batches, width, tok,
              model_dir, device) -> dict:
    """Every requested row in every dtype; prints the table, returns {'peak', 'rows'}."""
    import torch
    rows_wanted = set(args.rows.split(","))
    jax_device = jax.devices()[0]
    gpu_name = torch.cuda.get_device_name() if device == "cuda" else ""
    peaks = {"jax": {d: common.peak("jax", d, jax_device.platform, jax_device.device_kind)
                     for d in args.dtypes.split(",")},
             "torch": {d: common.peak("torch", d, device, gpu_name) for d in args.dtypes.split(",")}}

    users = [ids.shape[0] for ids, _ in batches]
    B = args.num_beams

    def flops(kind, steps):
        f = {"jax0": lambda u, s: common.flops_beam_ours(config, u, B, width, s, 0),
             "jax1": lambda u, s: common.flops_beam_ours(config, u, B, width, s, 1),
             "jax0_whole": lambda u, s: common.flops_beam_ours(config, u, B, width, s, 0),
             "jax1_whole": lambda u, s: common.flops_beam_ours(config, u, B, width, s, 1),
             "release0": lambda u, s: common.flops_beam_hf(config, u, B, width, s, False),
             "hf0": lambda u, s: common.flops_beam_hf(config, u, B, width, s, False),
             "release1": lambda u, s: common.flops_beam_hf(config, u, B, width + 1, s, True)}[kind]
        return sum(f(u, s) for u, s in zip(users, steps))

    rows = []
    for name in args.dtypes.split(","):
        jdt, tdt = common.jax_dtype(name), common.torch_dtype(name)
        found = {}
        for kind in ("jax0", "jax0_whole", "jax1", "jax1_whole"):
            if kind not in rows_wanted:
                continue
            n, whole = int(kind[3]), kind.endswith("_whole")
            with common.jax_precision(name):
                leaves, ups, compile_s, steps, elapsed = run_jax(
                    config, params, trie, batches, jdt, B, args.length_penalty, n,
                    cache_buckets=(trie.max_len,) if whole else None)
            found[kind] = leaves
            impl = f"ours, N={n}" + (", one decode-cache stage of the longest title" if whole
                                     else "")
            rows.append({"dtype": name, "engine": "jax", "row": kind, "num_thoughts": n,
                         "impl": impl, "users_per_s": ups, "compile_s": compile_s,
                         "decode_steps": steps, "precision": common.precision_note("jax", name),
                         **common.flop_fields(flops(kind, steps), elapsed, peaks["jax"][name])})
            print(f"  {name} {kind}: {ups:.2f} users/s", flush=True)
        torch_rows = [k for k in ("release0", "hf0", "release1") if k in rows_wanted]
        if torch_rows:
            from transformers import AutoModelForCausalLM
            import torch_reference as ref
            for kind in torch_rows:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdt).to(device).eval()
                bs, heads = batches, {tuple(ids[r, -HEAD_LEN:].tolist()) for ids, _ in batches
                                      for r in range(ids.shape[0])}
                if kind == "release1":
                    ratt = ref.LatentRATT(config.hidden_size)
                    ref.load_jax_latent(ratt, jax.device_get(params["latent"]))
                    model = ref.latent_generation_model(model, ratt.to(tdt).to(device), tok.thought_id)
                    bs = latent_batches
                    heads = {tuple(ids[r, -HEAD_LEN:].tolist()) for ids, _ in bs
                             for r in range(ids.shape[0])}
                way = "hf" if kind == "hf0" else "release"
                leaves, ups, steps, elapsed = run_torch(model, trie, bs, B, args.length_penalty,
                                                        tok.eos_id, tok.pad_id, way,
                                                        list(titles.values()), heads)
                found[kind] = leaves
                impl = {"release0": "transformers generate + the release's logits processor, N=0",
                        "hf0": "transformers generate + prefix_allowed_tokens_fn (Python trie), N=0",
                        "release1": "the release's latent model + its logits processor, N=1"}[kind]
                rows.append({"dtype": name, "engine": "torch", "row": kind,
                             "num_thoughts": 1 if kind == "release1" else 0, "impl": impl,
                             "users_per_s": ups, "decode_steps": steps,
                             "precision": common.precision_note("torch", name, "cast"),
                             **common.flop_fields(flops(kind, steps), elapsed, peaks["torch"][name])})
                print(f"  {name} {kind}: {ups:.2f} users/s", flush=True)
                del model
        # agreement and speed-ups: each torch row against the JAX row of the same N
        for r in rows:
            if r["dtype"] != name or not (r["engine"] == "torch" or r["row"].endswith("_whole")):
                continue
            mine = f"jax{r['num_thoughts']}"
            j = next((x for x in rows if x["dtype"] == name and x["row"] == mine), None)
            if j is not None:
                r["jax_speedup"] = j["users_per_s"] / r["users_per_s"]
                r.update({f"vs_{mine}_{k}": v for k, v in compare(found[mine], found[r["row"]]).items()})

    for engine, pk in peaks.items():
        common.remeasure_peaks(pk, engine, *((jax_device.platform, jax_device.device_kind)
                                            if engine == "jax" else (device, gpu_name)))
    for r in rows:
        common.set_peak(r, peaks[r["engine"]][r["dtype"]])

    print(f"\n{'dtype':<9}{'row':<10}{'users/s':>8}{'FLOP/s':>9}{'peak':>6}{'JAX x':>7}"
          f"{'top10 order':>12}{'top10 set':>10}{'top1':>6}{'steps':>12}")
    for r in rows:
        pct = f"{100 * r['fraction_of_peak']:.1f}%" if r.get("fraction_of_peak") else "n/a"
        mine = f"jax{r['num_thoughts']}"
        g = lambda k: f"{r[f'vs_{mine}_{k}']:.2f}" if f"vs_{mine}_{k}" in r else ""
        sp = f"{r['jax_speedup']:.1f}" if "jax_speedup" in r else ""
        print(f"{r['dtype']:<9}{r['row']:<10}{r['users_per_s']:>8.2f}"
              f"{common.fmt_flops(r.get('flops_per_s')):>9}{pct:>6}{sp:>7}{g('same_top10_order'):>12}"
              f"{g('same_top10_set'):>10}{g('same_top1'):>6}{str(r['decode_steps']):>12}")
    for engine, pk in peaks.items():
        for d, p in pk.items():
            print(f"peak {engine} {d}: {common.fmt_flops(p['peak_flops_per_s'])}FLOP/s ({p['peak_source']})")
    return {"peak": peaks, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
