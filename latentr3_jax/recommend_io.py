"""`latentr3 recommend --input histories.jsonl --output recs.jsonl`: batch recommendation
over a file, resumable.

Input: one JSON value per line (blank lines are skipped), either a list of titles or an
object {"history": [...], "k": 5, "id": anything}; `k` defaults to the command's --k and
`id` is copied to the output. The whole file is checked before any work, and a bad line
stops with its file, line and field.

Output: one object per input line, appended and flushed as each chunk finishes:
{"line": n, "id": ..., "recommendations": [{"item_id", "title", "score"}, ...],
"truncated": bool} (plus "generated" in bigrec mode). `<output>.meta.json` records the run
and settings; rerunning the same command skips the lines already written (a line cut by
a crash is dropped and redone), while other settings are refused unless --overwrite.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from tqdm import tqdm

from latentr3_jax.errors import InputError
from latentr3_jax.eval.ranker import ensemble_meta
from latentr3_jax.recommend import Ranked, Recommender
from latentr3_jax.utils.atomic import atomic_write_text
from latentr3_jax.utils.jsonio import read_json

CHUNK_BATCHES = 8     # batches per written chunk (a crash loses at most this much work)


def read_histories(path: str, default_k: int, rec: Recommender) -> list:
    """[(line number, history, k, id)] of an input file; InputError naming file, line, field."""
    out = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    with f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path}, line {n}"
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON ({e})") from None
            k, ident = default_k, None
            if isinstance(obj, dict):
                unknown = sorted(set(obj) - {"history", "k", "id"})
                if unknown:
                    raise InputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}"
                                     "; expected 'history', 'k', 'id'")
                if "history" not in obj:
                    raise InputError(f"{where}: field 'history' is missing")
                history, k, ident = obj["history"], obj.get("k", default_k), obj.get("id")
            else:
                history = obj
            try:
                rec._check([history])
            except InputError as e:
                raise InputError(f"{where}: field 'history': "
                                 f"{str(e).replace('history 0', 'history')}") from None
            try:
                k = rec._check_k(k)
            except InputError as e:
                raise InputError(f"{where}: field 'k': {e}") from None
            out.append((n, list(history), k, ident))
    return out


def record(r: Ranked, line: Optional[int] = None, ident=None) -> dict:
    out = {} if line is None else {"line": line}
    if ident is not None:
        out["id"] = ident
    out["recommendations"] = [{"item_id": x.item_id, "title": x.title, "score": x.score}
                              for x in r.items]
    out["truncated"] = bool(r.truncated)
    if r.generated is not None:
        out["generated"] = r.generated
    return out


def _done_lines(path: str) -> set:
    """Line numbers already in `path`; a trailing partial line is cut off the file."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    done = set()
    for n, text in enumerate(keep.decode("utf-8").splitlines(), 1):
        try:
            done.add(int(json.loads(text)["line"]))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}, line {n}: not a recommendation record; remove the file "
                             "or choose another --output") from None
    return done


def _meta(rec: Recommender, input_path: str, k: int) -> dict:
    e = rec.config.eval
    return {"run": rec.artifacts.run_dir, "checkpoint": rec.artifacts.which,
            "step": rec.artifacts.step, "input": os.path.abspath(input_path), "k": int(k),
            "mode": rec.mode, "num_beams": int(e.num_beams),
            "length_penalty": float(e.length_penalty), "grounding_beams": int(e.grounding_beams),
            "dtype": rec.config.model.dtype, "catalog_items": len(rec.catalog),
            **ensemble_meta(rec.config)}


def recommend_file(rec: Recommender, input_path: str, output_path: str, *,
                   k: Optional[int] = None, overwrite: bool = False,
                   progress: bool = False) -> dict:
    """Recommend for every history of `input_path` into `output_path` (module docstring);
    `k` is the default of lines that give none. Returns {"written": rows written now,
    "total": rows in the output}."""
    try:
        k = rec._check_k(k)
    except InputError as e:
        raise InputError(f"--k: {e}") from None
    todo = read_histories(input_path, k, rec)
    meta_path = output_path + ".meta.json"
    meta = _meta(rec, input_path, k)
    if os.path.exists(output_path):
        old = read_json(meta_path) if os.path.exists(meta_path) else None
        if old != meta and not overwrite:
            diff = ("no " + os.path.basename(meta_path) if old is None else ", ".join(
                f"{key} {old.get(key)!r} -> {meta[key]!r}" for key in meta
                if old.get(key) != meta[key]))
            raise InputError(f"{output_path}: written with other settings ({diff}); pass "
                             "--overwrite to start over or choose another --output")
        if old != meta:
            os.remove(output_path)
    done = _done_lines(output_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    todo = [t for t in todo if t[0] not in done]
    chunk = rec.batch_size * CHUNK_BATCHES
    bar = tqdm(total=len(todo) + len(done), initial=len(done), desc="recommend",
               unit="history", disable=not progress)
    written = 0
    with open(output_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            got = rec.recommend_with_info([h for _, h, _, _ in part], k=max(t[2] for t in part))
            for (n, _, kk, ident), r in zip(part, got):
                r = Ranked(r.items[:kk], r.truncated, r.generated)
                out.write(json.dumps(record(r, n, ident), ensure_ascii=False) + "\n")
            out.flush()
            written += len(part)
            bar.update(len(part))
    bar.close()
    return {"written": written, "total": written + len(done)}
