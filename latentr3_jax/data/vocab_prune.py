"""Vocabulary pruning: keep only the tokens a recommender's prompts and titles use.

A 49k-token LLM vocabulary is mostly unused by prompts made of one fixed instruction and
item titles: the embedding table and the LM head (the largest single matmul of a small
model's step) shrink with the vocabulary. `prune_checkpoint(src, out, datasets)` writes a
Hugging Face folder whose tokenizer and weights keep:

- every token the byte-level BPE produces on the datasets' prompts (both templates, all
  splits) and target titles;
- every token those are merged from (the merge closure), so the BPE walks the same merge
  path and these texts tokenise to the same tokens, only renumbered;
- the single-byte tokens (any text stays encodable: unseen words fall back to shorter
  pieces) and the added/special tokens.

Kept tokens keep their order; merges keep their rank. The check is built in: the pruned
tokenizer must encode the whole corpus to exactly the renumbered ids, or nothing is
written. Only the tokens' embedding rows (and untied LM-head columns) are kept, so the
pruned model's logits are the original's restricted to the kept tokens; the softmax now
normalises over fewer tokens, which is the one change to what the model computes.
`vocab_prune.json` in the output records the kept ids.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer as Backend

from latentr3_jax import hf
from latentr3_jax.data.d3 import Dataset, read_d3
from latentr3_jax.data.prompts import TEMPLATES, build_prompt, format_target
from latentr3_jax.errors import InputError
from latentr3_jax.utils.atomic import atomic_dir, file_mode
from latentr3_jax.utils.jsonio import read_json, write_json

RECORD = "vocab_prune.json"
_COPIED = ("tokenizer_config.json", "special_tokens_map.json")


def corpus(datasets: Sequence[Dataset], templates: Sequence[str] = TEMPLATES) -> list:
    """Every text the pipeline tokenises for these datasets: prompts of all splits and the
    target text of every catalog title, in each template."""
    texts = []
    for ds in datasets:
        for t in templates:
            texts += [format_target(title, t) for title in ds.catalog.titles.values()]
            for rows in ds.splits.values():
                texts += [build_prompt(s.history_titles, ds.category_word, t) for s in rows]
    return texts


def _merge_pairs(model: dict) -> list:
    out = []
    for m in model.get("merges", []):
        a, b = (m.split(" ", 1) if isinstance(m, str) else m)
        out.append((a, b))
    return out


def plan(tokenizer_json: dict, used_ids: Iterable[int]) -> list:
    """Sorted old ids to keep (module docstring) for a byte-level BPE tokenizer JSON."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise InputError(f"vocabulary pruning needs a BPE tokenizer, got {model.get('type')!r}")
    vocab = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    made_from = {}
    for a, b in _merge_pairs(model):
        made_from.setdefault(a + b, (a, b))   # the first (highest-rank) merge makes the token
    keep = {i for i, t in by_id.items() if len(t) == 1}
    keep |= {int(a["id"]) for a in tokenizer_json.get("added_tokens", [])}
    stack = [by_id[i] for i in used_ids if i in by_id]
    keep |= {int(i) for i in used_ids}
    seen = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in vocab:
            keep.add(vocab[t])
        if t in made_from:
            stack.extend(made_from[t])
    return sorted(keep)


def _remap_ids(obj, old_to_new: dict):
    """Special-token ids inside a post-processor / template, renumbered."""
    if isinstance(obj, dict):
        return {k: ([old_to_new[i] for i in v] if k == "ids" and isinstance(v, list)
                    else _remap_ids(v, old_to_new)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_remap_ids(v, old_to_new) for v in obj]
    return obj


def pruned_tokenizer_json(tokenizer_json: dict, keep: Sequence[int]) -> dict:
    old_to_new = {old: new for new, old in enumerate(keep)}
    model = dict(tokenizer_json["model"])
    kept_tokens = {t: old_to_new[i] for t, i in model["vocab"].items() if i in old_to_new}
    model["vocab"] = dict(sorted(kept_tokens.items(), key=lambda kv: kv[1]))
    merges = [m for m, (a, b) in zip(model.get("merges", []), _merge_pairs(model))
              if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    model["merges"] = merges
    out = dict(tokenizer_json)
    out["model"] = model
    added = []
    for a in tokenizer_json.get("added_tokens", []):
        added.append({**a, "id": old_to_new[int(a["id"])]})
    out["added_tokens"] = added
    if out.get("post_processor"):
        out["post_processor"] = _remap_ids(out["post_processor"], old_to_new)
    return out


def _check_encodes_alike(old: Backend, new: Backend, texts: list, old_ids: list,
                         old_to_new: dict, source: str) -> None:
    got = new.encode_batch(texts, add_special_tokens=False)
    for text, ids, enc in zip(texts, old_ids, got):
        want = [old_to_new[i] for i in ids]
        if enc.ids != want:
            raise InputError(f"{source}: the pruned tokenizer encodes {text[:60]!r} differently "
                             f"({enc.ids[:12]} vs {want[:12]}); nothing written")


def prune_checkpoint(src: str, out: str, datasets: Sequence[Dataset], *,
                     templates: Sequence[str] = TEMPLATES, sources: Optional[list] = None) -> dict:
    """Write the pruned Hugging Face folder `out` from the folder `src` (whole or not at
    all). Returns the summary also written to vocab_prune.json."""
    tok_file = os.path.join(src, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise InputError(f"{src}: no tokenizer.json (vocabulary pruning needs a fast tokenizer)")
    tok_json = read_json(tok_file)
    old = Backend.from_file(tok_file)
    texts = corpus(datasets, templates)
    if not texts:
        raise InputError("vocabulary pruning: the datasets give no text")
    old_ids = [e.ids for e in old.encode_batch(texts, add_special_tokens=False)]
    used = {i for ids in old_ids for i in ids}
    keep = plan(tok_json, used)
    new_json = pruned_tokenizer_json(tok_json, keep)
    new = Backend.from_str(json.dumps(new_json))
    old_to_new = {o: n for n, o in enumerate(keep)}
    _check_encodes_alike(old, new, texts, old_ids, old_to_new, src)

    config, params = hf.load_pretrained(src)
    if config.vocab_size < len(keep) or max(keep) >= config.vocab_size:
        raise InputError(f"{src}: the tokenizer has ids up to {max(keep)}, the model "
                         f"{config.vocab_size} rows")
    idx = np.asarray(keep)
    params = dict(params)
    params["embed"] = {"embedding": np.ascontiguousarray(params["embed"]["embedding"][idx])}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": np.ascontiguousarray(params["lm_head"]["kernel"][:, idx])}

    def renumber(i):
        return None if i is None else old_to_new.get(int(i))

    config = config.replace(vocab_size=len(keep), bos_token_id=renumber(config.bos_token_id),
                            eos_token_id=renumber(config.eos_token_id),
                            pad_token_id=renumber(config.pad_token_id))
    summary = {"source": os.path.abspath(src), "original_vocab": int(hf.read_hf_config(src).vocab_size),
               "kept": len(keep), "corpus_texts": len(texts), "templates": list(templates),
               "datasets": sources or [d.name for d in datasets], "kept_ids": [int(i) for i in keep]}
    with atomic_dir(out) as tmp:
        os.makedirs(tmp)
        hf.save_pretrained(config, params, tmp)
        new.save(os.path.join(tmp, "tokenizer.json"))
        for name in _COPIED:
            if os.path.isfile(os.path.join(src, name)):
                with open(os.path.join(src, name), encoding="utf-8") as f:
                    text = f.read()
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
        write_json(os.path.join(tmp, RECORD), summary)
        mode = file_mode()
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), mode)
    return summary


def prune_from_folders(src: str, out: str, folders: Sequence[str], *,
                       templates: Sequence[str] = TEMPLATES) -> dict:
    """`prune_checkpoint` with the datasets read from D3 folders."""
    datasets = [read_d3(f) for f in folders]
    return prune_checkpoint(src, out, datasets, templates=templates,
                            sources=[os.path.abspath(f) for f in folders])
