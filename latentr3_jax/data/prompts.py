"""Prompt templates, target text and tokenisation of samples (SPEC.md sections 3 and 7).

The thought tokens are not text: the model inserts its latent(s) between the prompt
and the target, so an `Encoded` keeps `prompt_ids` and `target_ids` apart. Labels are
only the target ids (title tokens + EOS).

Templates
- `latentr3` (default, faithful): the D3 / LatentR³ release's prompt, typos included;
  target `"Title"\\n` + EOS.
- `bigrec`: the Alpaca layout used by BIGRec ("### Input:" and blank lines between
  sections), with the same instruction and input sentences; target `Title\\n` + EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from latentr3_jax.errors import InputError

TEMPLATES = ("latentr3", "bigrec")
_TITLE_STRIP = ' \n"\r\t'

_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that "
             "provides further context. Write a response that appropriately completes the request.")


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise InputError(f"data.template={template!r}: expected one of {', '.join(TEMPLATES)}")


def history_text(history_titles: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in history_titles)


def build_prompt(history_titles: Sequence[str], category_word: str, template: str = "latentr3") -> str:
    """Prompt text up to and including the response header (no thought token, no target)."""
    _check_template(template)
    cat = category_word
    instruction = (f"Given a list of {cat} the user recetenly enjoy, please write a new {cat} "
                   "that the user may bought")
    user_input = f"The user has palyed the following {cat}s before: {history_text(history_titles)}"
    if template == "latentr3":
        return (f"{_PREAMBLE} \n\n### Instruction:\n{instruction}\n### User Input: \n"
                f"{user_input}\n\n### Response: \n")
    return f"{_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Input:\n{user_input}\n\n### Response:\n"


def format_target(title: str, template: str = "latentr3") -> str:
    """Target text without EOS: `"Title"\\n` (latentr3) or `Title\\n` (bigrec)."""
    _check_template(template)
    return f'"{title}"\n' if template == "latentr3" else f"{title}\n"


def normalize_title(title: str) -> str:
    """The release's comparison form of a title (evaluation's title rule, grounding):
    surrounding spaces, newlines, tabs and quotes removed."""
    return str(title).strip(_TITLE_STRIP)


def title_from_target(text: str) -> str:
    """Inverse of `format_target` for generated text (strip quotes, spaces, newlines)."""
    return text.strip().strip('"').strip()


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of one sample: the prompt (left-truncated) and the target (+ EOS)."""

    prompt_ids: list
    target_ids: list
    item_id: int = -1
    line: int = 0


def encode_prompt(tok, history_titles, category_word, template="latentr3", cutoff=512,
                  add_bos: bool = False) -> list:
    ids = tok.encode(build_prompt(history_titles, category_word, template))
    if add_bos and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    return ids[-cutoff:] if cutoff and cutoff > 0 else ids


def encode_target(tok, title: str, template: str = "latentr3") -> list:
    return tok.encode(format_target(title, template)) + [tok.eos_id]


def encode_sample(tok, sample, category_word: str, template: str = "latentr3",
                  cutoff: int = 512, *, add_bos: bool = False) -> Encoded:
    return Encoded(prompt_ids=encode_prompt(tok, sample.history_titles, category_word, template,
                                            cutoff, add_bos),
                   target_ids=encode_target(tok, sample.target_title, template),
                   item_id=int(sample.target_id), line=int(sample.line))


def encode_split(tok, samples, category_word: str, template: str = "latentr3",
                 cutoff: int = 512, *, add_bos: bool = False, max_target_len: Optional[int] = None
                 ) -> list:
    """Encode many samples (batched through the Rust tokenizer). With `max_target_len`,
    longer targets are cut (keeping the EOS as the last label)."""
    _check_template(template)
    prompts = tok.encode_batch([build_prompt(s.history_titles, category_word, template) for s in samples])
    targets = tok.encode_batch([format_target(s.target_title, template) for s in samples])
    out = []
    for s, p, t in zip(samples, prompts, targets):
        if add_bos and tok.bos_id is not None:
            p = [tok.bos_id] + p
        if cutoff and cutoff > 0:
            p = p[-cutoff:]
        t = t + [tok.eos_id]
        if max_target_len and len(t) > max_target_len:
            t = t[:max_target_len - 1] + [tok.eos_id]
        out.append(Encoded(prompt_ids=p, target_ids=t, item_id=int(s.target_id), line=int(s.line)))
    return out


def catalog_target_ids(tok, catalog, template: str = "latentr3") -> dict:
    """item id -> target ids (`"Title"\\n` + EOS) as the model emits them: the trie's content."""
    ids = catalog.ids
    enc = tok.encode_batch([format_target(catalog.titles[i], template) for i in ids])
    return {i: e + [tok.eos_id] for i, e in zip(ids, enc)}


def check_target_tokenisation(tok, items, category_word: Optional[str] = None,
                              template: str = "latentr3", *, limit: Optional[int] = None,
                              name: str = "") -> int:
    """SPEC.md section 7: the target's ids tokenised alone must be the ids the target gets
    when prompt + target are tokenised jointly (the joint ids end with them, and the ids
    before them decode to exactly the prompt), otherwise the trie of targets would not
    match what the model sees. `items` are `Sample`s (needs `category_word`) or `Encoded`s
    (the prompt is decoded back to text). Raises InputError naming the first bad sample;
    returns how many were checked."""
    _check_template(template)
    n = 0
    for k, it in enumerate(items):
        if limit is not None and n >= limit:
            break
        if hasattr(it, "prompt_ids"):
            prompt = tok.decode(it.prompt_ids, skip_special_tokens=False)
            target_ids = list(it.target_ids)
            if target_ids and target_ids[-1] == tok.eos_id:
                target_ids = target_ids[:-1]
            target = tok.decode(target_ids, skip_special_tokens=False)
            line = getattr(it, "line", 0)
        else:
            if category_word is None:
                raise InputError("check_target_tokenisation: category_word is needed for samples")
            prompt = build_prompt(it.history_titles, category_word, template)
            target = format_target(it.target_title, template)
            target_ids = tok.encode(target)
            line = it.line
        alone = tok.encode(target)
        joint = tok.encode(prompt + target)
        head = joint[:len(joint) - len(alone)]
        ok = (alone == target_ids and joint[len(head):] == alone
              and tok.decode(head, skip_special_tokens=False) == prompt)
        if not ok:
            where_ = f"{name + ' ' if name else ''}sample {k} (line {line})"
            raise InputError(
                f"{where_}: the target {target!r} tokenises differently after the prompt "
                f"(alone {alone[:12]}, joint ends {joint[-len(alone):][:12]}); the constrained "
                "decoding trie would not match the model's tokens")
        n += 1
    return n
