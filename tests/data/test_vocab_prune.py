"""Vocabulary pruning: the pruned tokenizer renumbers the corpus' tokens and nothing else,
the pruned model's logits are the original's kept columns, unseen text stays encodable,
and a failed check writes nothing."""

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from latentr3_jax import cli, hf
from latentr3_jax import data as D
from latentr3_jax.data import vocab_prune as VP
from latentr3_jax.data.synthetic import generate
from latentr3_jax.errors import InputError
from latentr3_jax.model import decoder
from latentr3_jax.model.config import tiny_config

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared"
SMOL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
INDUSTRIAL = SHARED / "data" / "amazon18" / "Industrial_and_Scientific"

ENGLISH = ["The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
           "Quantum chromodynamics describes strong interactions between quarks and gluons.",
           "Municipal elections were postponed because of unprecedented flooding downtown."] * 30


def _model(tmp_path, tie=True):
    """A BPE tokenizer trained on more than the dataset, a random model of its size saved
    as a Hugging Face folder, and the (smaller) dataset to prune for."""
    catalog, splits, _ = generate(num_items=40, num_users=30, seed=1)
    ds = D.Dataset(name="syn", category_word="albums", catalog=catalog, splits=splits)
    big_catalog, big_splits, _ = generate(num_items=400, num_users=200, seed=2)
    big = D.Dataset(name="big", category_word="albums", catalog=big_catalog, splits=big_splits)
    tok = D.train_tokenizer(D.tokenizer_corpus(big, splits=("train", "test")) + ENGLISH, 900)
    src = tmp_path / "src"
    tok.save(src)
    config = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         tie_word_embeddings=tie, eos_token_id=tok.eos_id)
    import jax
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    hf.save_pretrained(config, params, str(src))
    return ds, tok, str(src)


@pytest.mark.parametrize("tie", [True, False])
def test_prune_renumbers_and_keeps_logits(tmp_path, tie):
    ds, tok, src = _model(tmp_path, tie)
    out = str(tmp_path / "pruned")
    s = VP.prune_checkpoint(src, out, [ds])
    keep = s["kept_ids"]
    assert s["kept"] == len(keep) < tok.vocab_size and s["original_vocab"] == tok.vocab_size
    rec = json.loads((tmp_path / "pruned" / VP.RECORD).read_text())
    assert rec["kept_ids"] == keep
    new_tok = D.load_tokenizer(out)
    old_to_new = {o: n for n, o in enumerate(keep)}
    texts = VP.corpus([ds])
    for text in texts[::7]:
        assert new_tok.encode(text) == [old_to_new[i] for i in tok.encode(text)]
    # special ids follow their tokens
    assert new_tok.eos_id == old_to_new[tok.eos_id]
    assert new_tok.thought_id == len(keep) - 1   # <|Thought|> stays the last id

    c_old, p_old = hf.load_pretrained(src)
    c_new, p_new = hf.load_pretrained(out)
    assert c_new.vocab_size == len(keep) and c_new.eos_token_id == old_to_new[tok.eos_id]
    prompt = D.build_prompt(list(ds.splits["test"][0].history_titles), ds.category_word)
    ids_old = jnp.asarray([tok.encode(prompt)])
    ids_new = jnp.asarray([new_tok.encode(prompt)])
    lo, _, _ = decoder.apply(c_old, p_old, ids_old)
    ln, _, _ = decoder.apply(c_new, p_new, ids_new)
    np.testing.assert_allclose(np.asarray(ln), np.asarray(lo)[..., keep], rtol=1e-5, atol=1e-5)


def test_unseen_text_still_encodes(tmp_path):
    ds, tok, src = _model(tmp_path)
    out = str(tmp_path / "pruned")
    VP.prune_checkpoint(src, out, [ds])
    new_tok = D.load_tokenizer(out)
    for text in ENGLISH[:3] + ["Zebra ñandú 12345 — naïve café"]:
        ids = new_tok.encode(text)
        assert new_tok.decode(ids) == text
        assert len(ids) >= len(tok.encode(text))   # shorter pieces where merges were dropped


def test_the_merge_closure_is_needed(tmp_path, monkeypatch):
    """Dropping the parts a kept token is merged from changes the tokenisation: the check
    catches it and nothing is written."""
    ds, tok, src = _model(tmp_path)
    real_plan = VP.plan

    def used_only(tokenizer_json, used_ids):
        keep = set(real_plan(tokenizer_json, used_ids))
        vocab = tokenizer_json["model"]["vocab"]
        parts = {vocab[t] for m in tokenizer_json["model"]["merges"]
                 for t in (m.split(" ", 1) if isinstance(m, str) else m)
                 if len(t) > 1 and vocab.get(t) not in set(used_ids)}
        return sorted(keep - parts)

    monkeypatch.setattr(VP, "plan", used_only)
    with pytest.raises(InputError, match="encodes .* differently"):
        VP.prune_checkpoint(src, str(tmp_path / "pruned"), [ds])
    assert not (tmp_path / "pruned").exists()


def test_cli(tmp_path, capsys):
    ds, tok, src = _model(tmp_path)
    folder = tmp_path / "d3"
    D.write_d3(folder, ds.catalog, ds.splits)
    out = tmp_path / "pruned"
    assert cli.main(["convert", "--hf", src, "--prune-vocab", str(folder), "--out", str(out)]) == 0
    assert "tokens kept" in capsys.readouterr().out
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert cli.main(["convert", "--hf", src, "--prune-vocab", str(folder), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["convert", "--to-hf", "--from", src, "--prune-vocab", str(folder),
                     "--out", str(tmp_path / "x")]) == 2
    assert "--prune-vocab takes --gguf FILE or --hf DIR" in capsys.readouterr().err
    assert cli.main(["convert", "--hf", src, "--prune-vocab", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "y")]) == 2


@pytest.mark.slow
def test_smollm2_on_industrial(tmp_path):
    if not SMOL.exists() or not INDUSTRIAL.exists():
        pytest.skip(f"real model or data not found under {SHARED} (../shared is absent)")
    src = tmp_path / "smol"
    assert cli.main(["convert", "--gguf", str(SMOL), "--out", str(src)]) == 0
    out = tmp_path / "pruned"
    s = VP.prune_from_folders(str(src), str(out), [str(INDUSTRIAL)])
    assert 4000 < s["kept"] < 49152 // 4   # about a sixth of the vocabulary
    keep = s["kept_ids"]
    old_tok, new_tok = D.load_tokenizer(str(src)), D.load_tokenizer(str(out))
    ds = D.read_d3(str(INDUSTRIAL))
    old_to_new = {o: n for n, o in enumerate(keep)}
    prompt = D.build_prompt(list(ds.splits["test"][0].history_titles), ds.category_word)
    assert new_tok.encode(prompt) == [old_to_new[i] for i in old_tok.encode(prompt)]
    c_old, p_old = hf.load_pretrained(str(src))
    c_new, p_new = hf.load_pretrained(str(out))
    lo, _, _ = decoder.apply(c_old, p_old, jnp.asarray([old_tok.encode(prompt)]))
    ln, _, _ = decoder.apply(c_new, p_new, jnp.asarray([new_tok.encode(prompt)]))
    np.testing.assert_allclose(np.asarray(ln), np.asarray(lo)[..., keep], rtol=1e-4, atol=1e-4)
    assert os.path.getsize(out / "model.safetensors") < 0.85 * os.path.getsize(src / "model.safetensors")
