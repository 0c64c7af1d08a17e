"""Prompt templates (SPEC.md section 3), tokenizers, and the target tokenisation check (section 7)."""

import json
import shutil

import numpy as np
import pytest

from latentr3_jax.data import (Encoded, build_prompt, catalog_target_ids, check_target_tokenisation,
                               encode_sample, encode_split, format_target, load_tokenizer,
                               tokenizer_corpus, train_tokenizer)
from latentr3_jax.data.d3 import Dataset
from latentr3_jax.data.synthetic import generate
from latentr3_jax.errors import InputError

# SPEC.md section 3, verbatim (typos are the original's).
SPEC_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \\n\\n### Instruction:\\n"
    "Given a list of {cat} the user recetenly enjoy, please write a new {cat} that the user may "
    "bought\\n### User Input: \\nThe user has palyed the following {cat}s before: \"t1\", \"t2\""
    "\\n\\n### Response: \\n")


@pytest.fixture(scope="module")
def synth():
    cat, splits, _ = generate(num_items=200, num_users=150, seed=3)
    return Dataset("synthetic", "albums", cat, splits)


@pytest.fixture(scope="module")
def tok(synth):
    return train_tokenizer(tokenizer_corpus(synth), 700)


def test_latentr3_prompt_is_spec_verbatim():
    want = SPEC_PROMPT.replace("{cat}", "musics").encode().decode("unicode_escape")
    assert build_prompt(["t1", "t2"], "musics") == want
    assert "palyed the following musicss before" in want


def test_bigrec_prompt_and_targets():
    p = build_prompt(["A", 'B "x"'], "toys and games", "bigrec")
    assert p.endswith('### Input:\nThe user has palyed the following toys and gamess before: "A", "B "x""'
                      "\n\n### Response:\n")
    assert "\n\n### Instruction:\nGiven a list of toys and games" in p
    assert format_target("Kind of Blue") == '"Kind of Blue"\n'
    assert format_target("Kind of Blue", "bigrec") == "Kind of Blue\n"
    with pytest.raises(InputError, match="data.template='alpaca'"):
        build_prompt(["a"], "x", "alpaca")


def test_encode_sample_truncates_left_and_appends_eos(tok, synth):
    s = max(synth.splits["train"], key=lambda s: len(s.history_ids))
    full = tok.encode(build_prompt(s.history_titles, "albums"))
    e = encode_sample(tok, s, "albums", "latentr3", cutoff=20)
    assert e.prompt_ids == full[-20:] and len(full) > 20
    assert tok.decode(e.prompt_ids).endswith("### Response: \n")
    assert e.target_ids == tok.encode(f'"{s.target_title}"\n') + [tok.eos_id]
    assert tok.decode(e.target_ids) == f'"{s.target_title}"\n'
    assert tok.thought_id not in e.prompt_ids + e.target_ids
    assert e.item_id == s.target_id and e.line == s.line
    rows = synth.splits["valid"][:30]
    assert encode_split(tok, rows, "albums", "bigrec", 64) == [encode_sample(tok, r, "albums", "bigrec", 64)
                                                              for r in rows]
    cut = encode_split(tok, rows, "albums", max_target_len=3)
    assert all(len(c.target_ids) <= 3 and c.target_ids[-1] == tok.eos_id for c in cut)


def test_catalog_target_ids(tok, synth):
    ids = catalog_target_ids(tok, synth.catalog)
    assert set(ids) == set(synth.catalog.ids)
    i = synth.catalog.ids[5]
    assert ids[i] == tok.encode('"' + synth.catalog.titles[i] + '"\n') + [tok.eos_id]


def test_trained_tokenizer_ids_and_round_trip(tok, tmp_path):
    assert tok.vocab_size == 700 and tok.thought_id == 699
    small = train_tokenizer(["tiny corpus"] * 3, 5000)     # BPE stops when nothing is left to merge
    assert small.vocab_size < 5000 and small.thought_id == small.vocab_size - 1
    assert tok.eos_id == tok.pad_id == tok.backend.token_to_id("<|endoftext|>")
    assert tok.encode("<|Thought|>") == [tok.thought_id]
    text = 'Smoky "Saxophone" of the Bayou — é 2018\n'
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "t")
    back = load_tokenizer(tmp_path / "t")
    assert (back.vocab_size, back.eos_id, back.pad_id, back.thought_id) == (700, tok.eos_id, tok.pad_id, 699)
    assert back.encode(text) == tok.encode(text)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.convert_tokens_to_ids("<|Thought|>") == 699 and hf.eos_token_id == tok.eos_id


def _qwen_dir(tok, d):
    """A transformers Qwen2 tokenizer built from our BPE's vocab/merges, saved as HF does."""
    from transformers import Qwen2Tokenizer
    d.mkdir()
    tok.backend.model.save(str(d))
    vocab = json.loads((d / "vocab.json").read_text())
    merges = [tuple(m.split(" ")) for m in (d / "merges.txt").read_text().split("\n")[1:] if m]
    hf = Qwen2Tokenizer(vocab=vocab, merges=merges)
    hf.save_pretrained(str(d / "hf"))
    return hf, d / "hf"


def test_load_hf_tokenizer_dir(tok, tmp_path, synth):
    hf, d = _qwen_dir(tok, tmp_path / "q")
    loaded = load_tokenizer(d)
    assert loaded.thought_id == loaded.vocab_size - 1 == len(hf)
    assert loaded.eos_id == hf.eos_token_id and loaded.pad_id == hf.pad_token_id
    s = synth.splits["test"][0]
    text = build_prompt(s.history_titles, "albums") + format_target(s.target_title)
    assert loaded.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    # without tokenizer.json: AutoTokenizer from vocab.json + merges.txt
    slow = tmp_path / "slow"
    slow.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "q" / f, slow / f)
    (slow / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>"}))
    assert load_tokenizer(slow).encode(text) == loaded.encode(text)


def test_thought_must_be_last(tok, tmp_path):
    from tokenizers import AddedToken
    tok.save(tmp_path / "t")
    from tokenizers import Tokenizer as Backend
    b = Backend.from_file(str(tmp_path / "t" / "tokenizer.json"))
    b.add_special_tokens([AddedToken("<|extra|>", special=True)])
    b.save(str(tmp_path / "t" / "tokenizer.json"))
    with pytest.raises(InputError, match=r"<\|Thought\|> has id 699 but must be the last id"):
        load_tokenizer(tmp_path / "t")
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "t" / "tokenizer.json").write_text("{broken")
    with pytest.raises(InputError, match="cannot load"):
        load_tokenizer(tmp_path / "t")


@pytest.mark.parametrize("template", ["latentr3", "bigrec"])
def test_target_tokenisation_consistent(tok, synth, template):
    rows = synth.splits["train"] + synth.splits["test"]
    assert check_target_tokenisation(tok, rows, "albums", template) == len(rows)
    enc = encode_split(tok, synth.splits["test"], "albums", template, cutoff=40)
    assert check_target_tokenisation(tok, enc) == len(enc)


def test_target_tokenisation_detects_merges_across_the_boundary(tok):
    # A prompt that ends inside a word: the joint text merges across the boundary.
    bad = Encoded(prompt_ids=tok.encode("The Smoky Sax"), target_ids=tok.encode("ophone\n") + [tok.eos_id],
                  item_id=7, line=42)
    good = Encoded(prompt_ids=tok.encode("Response: \n"), target_ids=tok.encode('"Sax"\n') + [tok.eos_id])
    assert check_target_tokenisation(tok, [good]) == 1
    with pytest.raises(InputError, match=r"valid sample 1 \(line 42\): the target 'ophone\\n' tokenises "
                                         "differently"):
        check_target_tokenisation(tok, [good, bad], name="valid")


def test_byte_bpe_without_split_fails_the_check(synth):
    """A BPE without a pre-tokeniser split learns '\\n"' merges, so targets change in context."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    from latentr3_jax.data.tokenizer import Tokenizer
    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    b.decoder = decoders.ByteLevel()
    texts = [build_prompt(s.history_titles, "albums") + format_target(s.target_title)
             for s in synth.splits["train"]]
    b.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    with pytest.raises(InputError, match="tokenises differently after the prompt"):
        check_target_tokenisation(Tokenizer(b, "<|endoftext|>"), synth.splits["test"], "albums")


def test_make_tokenizer_from_config(synth, tok, tmp_path):
    from latentr3_jax.config import base_config
    from latentr3_jax.data import make_tokenizer
    cfg = base_config()
    cfg.tokenizer.vocab_size = 700
    trained = make_tokenizer(cfg, synth)
    assert trained.encode("Smoky Saxophone") == tok.encode("Smoky Saxophone")
    tok.save(tmp_path / "t")
    cfg.tokenizer.path = str(tmp_path / "t")
    assert make_tokenizer(cfg, synth).vocab_size == tok.vocab_size


@pytest.mark.slow
def test_real_cds_token_lengths_and_consistency():
    """SPEC.md section 9: an 8,000-token BPE on the CDs catalog and prompts gives prompts of
    ~97 (train) / ~116 (test) tokens and targets of ~7.5."""
    from conftest import amazon_dir
    from latentr3_jax.data import read_d3
    ds = read_d3(amazon_dir("CDs_and_Vinyl"))
    cds_tok = train_tokenizer(tokenizer_corpus(ds), 8000)
    assert cds_tok.vocab_size == 8000
    means = {}
    for split in ("train", "test"):
        enc = encode_split(cds_tok, ds.splits[split], ds.category_word, "latentr3", 512)
        means[split] = (np.mean([len(e.prompt_ids) for e in enc]), np.mean([len(e.target_ids) for e in enc]))
        assert check_target_tokenisation(cds_tok, enc, name=split) == len(enc)
    print("CDs mean prompt/target tokens:", {k: tuple(round(float(x), 1) for x in v) for k, v in means.items()})
    assert 88 < means["train"][0] < 106 and 105 < means["test"][0] < 127
    assert 6.5 < means["train"][1] < 9
