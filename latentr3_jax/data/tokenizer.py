"""Tokenizers: a local Hugging Face directory, or a byte-level BPE trained in-process.

Either way `<|Thought|>` is the LAST id (`thought_id == vocab_size - 1`): the model's
embedding table grows by exactly one row for it. `encode` never adds special tokens
(no BOS for Qwen; the EOS is appended explicitly to targets).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from latentr3_jax.config import BPE_MIN_VOCAB, TOKENIZER_SPLITS
from latentr3_jax.data.prompts import build_prompt, format_target
from latentr3_jax.errors import InputError, one_line
from latentr3_jax.gguf_convert import resolve_model_path

THOUGHT_TOKEN = "<|Thought|>"
EOS_TOKEN = "<|endoftext|>"
META_FILE = "latentr3_tokenizer.json"


def _token_str(v) -> Optional[str]:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the ids the model needs."""

    def __init__(self, backend, eos_token: str, pad_token: Optional[str] = None,
                 bos_token: Optional[str] = None):
        self.backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token or eos_token
        self.bos_token = bos_token
        for name, tok in (("eos", self.eos_token), ("pad", self.pad_token)):
            if backend.token_to_id(tok) is None:
                raise InputError(f"tokenizer: {name} token {tok!r} is not in the vocabulary")
        size = backend.get_vocab_size(with_added_tokens=True)
        tid = backend.token_to_id(THOUGHT_TOKEN)
        if tid is None:
            backend.add_special_tokens([AddedToken(THOUGHT_TOKEN, special=True, normalized=False)])
            tid = backend.token_to_id(THOUGHT_TOKEN)
            size = backend.get_vocab_size(with_added_tokens=True)
        max_id = max(backend.get_vocab(with_added_tokens=True).values())
        if tid != max_id or tid != size - 1:
            raise InputError(f"tokenizer: {THOUGHT_TOKEN} has id {tid} but must be the last id "
                             f"(vocabulary size {size}, largest id {max_id})")
        self.thought_id = tid
        self.vocab_size = tid + 1
        self.eos_id = backend.token_to_id(self.eos_token)
        self.pad_id = backend.token_to_id(self.pad_token)
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None

    def encode(self, text: str) -> list:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory) -> None:
        """`tokenizer.json` (with <|Thought|>), an HF `tokenizer_config.json`, and our ids."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
               "pad_token": self.pad_token, "bos_token": self.bos_token,
               "add_bos_token": False, "clean_up_tokenization_spaces": False,
               "model_max_length": 1 << 30}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
        meta = {"eos_token": self.eos_token, "pad_token": self.pad_token,
                "bos_token": self.bos_token, "thought_token": THOUGHT_TOKEN,
                "thought_id": self.thought_id, "vocab_size": self.vocab_size}
        (d / META_FILE).write_text(json.dumps(meta, indent=1))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, thought_id={self.thought_id})")


def _special_tokens_from_config(d: pathlib.Path) -> dict:
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json", META_FILE):
        p = d / name
        if p.exists():
            try:
                cfg = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{p}: not valid JSON ({e})") from None
            except OSError as e:
                raise InputError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
            if not isinstance(cfg, dict):
                raise InputError(f"{p}: expected a JSON object")
            for key in ("eos_token", "pad_token", "bos_token"):
                v = _token_str(cfg.get(key))
                if v:
                    out[key] = v
    return out


def load_tokenizer(directory) -> Tokenizer:
    """Tokenizer of a local HF directory (`tokenizer.json`, else `AutoTokenizer`), or of a
    .gguf file (its converted folder: gguf_convert.resolve_model_path)."""
    d = pathlib.Path(resolve_model_path(os.fspath(directory)))
    if not d.is_dir():
        raise InputError(f"{d}: tokenizer directory not found")
    special = _special_tokens_from_config(d)
    if (d / "tokenizer.json").exists():
        try:
            backend = Backend.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise InputError(f"{d / 'tokenizer.json'}: cannot load ({one_line(e)})") from None
    else:
        try:
            from transformers import AutoTokenizer   # start-up cost: only folders without tokenizer.json
            hf = AutoTokenizer.from_pretrained(str(d), local_files_only=True, use_fast=True)
        except Exception as e:
            raise InputError(f"{d}: no tokenizer.json and AutoTokenizer failed ({one_line(e)})") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise InputError(f"{d}: only fast (Rust) tokenizers are supported")
        for key in ("eos_token", "pad_token", "bos_token"):
            v = getattr(hf, key, None)
            if v and key not in special:
                special[key] = str(v)
    eos = special.get("eos_token")
    if eos is None:
        for cand in (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>"):
            if backend.token_to_id(cand) is not None:
                eos = cand
                break
    if eos is None:
        raise InputError(f"{d}: cannot tell the EOS token (no eos_token in tokenizer_config.json)")
    return Tokenizer(backend, eos, special.get("pad_token"), special.get("bos_token"))


# Qwen2's pre-tokenisation split: digits one by one, a leading punctuation mark joins the
# following word, punctuation keeps trailing newlines, so `"Title"\n` becomes few tokens.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    split: str = "qwen") -> Tokenizer:
    """Byte-level BPE of at most `vocab_size` ids in total (including <|endoftext|> and
    <|Thought|>; fewer when the corpus runs out of pairs seen `min_frequency` times).
    `split`: 'qwen' (Qwen2's pre-tokeniser regex, default) or 'gpt2'."""
    if vocab_size < BPE_MIN_VOCAB:
        raise InputError(f"tokenizer.vocab_size={vocab_size}: byte-level BPE needs at least "
                         f"{BPE_MIN_VOCAB}")
    backend = Backend(models.BPE())
    if split == "qwen":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif split == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise InputError(f"tokenizer split {split!r}: expected one of {', '.join(TOKENIZER_SPLITS)}")
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(iter(texts), trainer=trainer)
    return Tokenizer(backend, EOS_TOKEN, EOS_TOKEN)


def tokenizer_corpus(dataset, template: str = "latentr3", splits=("train",)) -> list:
    """Texts to train a BPE on: every catalog title as a target, and the split prompts."""
    texts = [format_target(t, template) for t in dataset.catalog.titles.values()]
    for split in splits:
        for s in dataset.splits.get(split, []):
            texts.append(build_prompt(s.history_titles, dataset.category_word, template))
    return texts


def make_tokenizer(cfg, dataset) -> Tokenizer:
    """The run's tokenizer: cfg.tokenizer.path, else the model's hf_path, else a byte-level
    BPE of cfg.tokenizer.vocab_size trained on the catalog titles and the train prompts."""
    path = cfg.tokenizer.path or cfg.model.hf_path
    if path:
        return load_tokenizer(path)
    return train_tokenizer(tokenizer_corpus(dataset, cfg.data.template), cfg.tokenizer.vocab_size,
                           min_frequency=cfg.tokenizer.min_frequency, split=cfg.tokenizer.split)
