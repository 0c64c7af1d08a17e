"""Hostile input: mutated CSV rows, info files, tokenizer and HF checkpoint directories.

Every case ends in success or an InputError whose message is one line; the CLI answers
bad input with exit code 2 and one line on stderr; writers interrupted mid-write leave
no partial file and no temporary file behind.
"""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from latentr3_jax.data import d3
from latentr3_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def outcome(fn, *args, **kw):
    """Run fn; return ('ok', value) or ('input_error', message). Anything else fails."""
    try:
        return "ok", fn(*args, **kw)
    except InputError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return "input_error", msg
    except Exception as e:  # noqa: BLE001 - this is what the test is about
        pytest.fail(f"{type(e).__name__} escaped instead of InputError: {e!r}"[:2000])


# --------------------------------------------------------------------------- D3 folders

TITLES = {10: "Abbey Road", 11: "Kind of Blue", 12: 'Say "Hi", Bye', 13: "Blue Train",
          14: "Rumours"}
HEADER = list(d3.D3_COLUMNS)


def valid_row(hist=(10, 11), target=12, user="u1"):
    return {"user_id": user, "history_item_id": repr(list(hist)),
            "item_id": str(target),
            "history_item_title": repr([TITLES[i] for i in hist]),
            "item_title": TITLES[target], "history_timestamp": repr([1, 2][:len(hist)]),
            "timestamp": "3"}


def csv_bytes(rows) -> bytes:
    """Rows are dicts (written with the csv module) or raw bytes lines."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    out = buf.getvalue().encode()
    for r in rows:
        if isinstance(r, bytes):
            out += r if r.endswith(b"\n") else r + b"\n"
        else:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow([r.get(c, "") for c in HEADER])
            out += buf.getvalue().encode("utf-8", "surrogatepass")
    return out


def info_bytes(titles=TITLES) -> bytes:
    return "".join(f"{t}\t{i}\n" for i, t in titles.items()).encode()


def make_folder(root, *, info=None, train=None, valid=None, test=None) -> pathlib.Path:
    folder = pathlib.Path(tempfile.mkdtemp(dir=root, prefix="d3_"))
    (folder / "info.txt").write_bytes(info_bytes() if info is None else info)
    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        data = rows if isinstance(rows, bytes) else csv_bytes(rows or [valid_row()])
        (folder / f"{split}.csv").write_bytes(data)
    return folder


junk_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                   st.floats(allow_nan=True, allow_infinity=True), junk_text)
literal = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
                       | st.dictionaries(junk_text, c, max_size=2), max_leaves=6)

COLUMNS = HEADER


@st.composite
def hostile_row(draw):
    """A valid row with one or two mutations, as bytes or as a field dict."""
    row = valid_row(hist=tuple(draw(st.lists(st.sampled_from(sorted(TITLES)), min_size=1,
                                             max_size=4))),
                    target=draw(st.sampled_from(sorted(TITLES))))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from([
            "junk_field", "literal_field", "cut_list", "unknown_id", "title_mismatch",
            "empty_history", "drop_columns", "extra_columns", "non_utf8", "huge_field",
            "quotes_newlines", "nested", "bad_timestamp", "raw_junk", "length_mismatch"]))
        col = draw(st.sampled_from(COLUMNS))
        if kind == "junk_field":
            row[col] = draw(junk_text)
        elif kind == "literal_field":
            row[col] = repr(draw(literal))
        elif kind == "cut_list":
            v = row["history_item_id" if draw(st.booleans()) else "history_item_title"]
            cut = draw(st.integers(0, max(len(v) - 1, 0)))
            row[col] = v[:cut] if draw(st.booleans()) else v[cut:]
        elif kind == "unknown_id":
            bad = draw(st.integers(-5, 10**25).filter(lambda i: i not in TITLES))
            if draw(st.booleans()):
                row["item_id"] = str(bad)
            else:
                row["history_item_id"] = repr([bad] * len(eval(row["history_item_id"])))
        elif kind == "title_mismatch":
            row["item_title" if draw(st.booleans()) else "history_item_title"] = \
                draw(st.sampled_from(["Abbey  Road ", "abbey road", "['Kind of Blue']", "",
                                      "Rumours\nRumours"]))
        elif kind == "empty_history":
            row["history_item_id"], row["history_item_title"] = "[]", "[]"
        elif kind == "drop_columns":
            keep = draw(st.integers(0, len(COLUMNS) - 1))
            return ",".join(f'"{row[c]}"' for c in COLUMNS[:keep]).encode("utf-8", "replace")
        elif kind == "extra_columns":
            return (",".join(f'"{row[c]}"' for c in COLUMNS) + ',"x",' + "9" * 50).encode()
        elif kind == "non_utf8":
            line = csv_bytes([row]).split(b"\n", 1)[1]
            pos = draw(st.integers(0, len(line)))
            return line[:pos] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe2\x82", b"\x80\x80"])) + line[pos:]
        elif kind == "huge_field":
            row[col] = draw(st.sampled_from(["x" * 200_000, "[" + "1," * 70_000 + "1]",
                                             "[" * 50_000 + "]" * 50_000, "9" * 5000]))
        elif kind == "quotes_newlines":
            row[col] = draw(st.sampled_from(['"', '""', 'a\nb', '\r', 'a"b\n"c', "'", "\\", "\x00"]))
        elif kind == "nested":
            row[col] = draw(st.sampled_from(["[[10]]", "[10, [11]]", "[(10,)]", "[{1: 2}]",
                                             "[10.0]", "[True]", "['10']", "[b'x']", "[1j]",
                                             "[None]", "[...]", "[__import__('os')]", "[1 if 1 else 2]"]))
        elif kind == "bad_timestamp":
            row[draw(st.sampled_from(["timestamp", "history_timestamp"]))] = draw(st.sampled_from(
                ["inf", "-inf", "nan", "1e999", "[1e999]", "[inf]", "['x']", "[[1]]", "5",
                 "[1, 2", "x", "[" * 3000 + "]" * 3000, "{1: 2}", "[-1e400]"]))
        elif kind == "raw_junk":
            return draw(st.binary(max_size=60)).replace(b"\n", b" ")
        elif kind == "length_mismatch":
            row["history_item_title"] = repr([TITLES[10]] * (len(eval(row["history_item_id"])) + 1))
    return row


@FUZZ
@given(rows=st.lists(hostile_row(), min_size=1, max_size=3), split=st.sampled_from(["train", "test"]),
       skip=st.booleans())
def test_csv_rows(tmp_path, rows, split, skip):
    mixed = [valid_row()] + rows + [valid_row(hist=(13,), target=14)]
    folder = make_folder(tmp_path, **{split: mixed})
    kind, value = outcome(d3.read_d3, folder, skip_invalid=skip)
    if kind == "ok":
        # whatever was accepted agrees with the catalog
        for samples in value.splits.values():
            for s in samples:
                assert s.target_id in TITLES and all(h in TITLES for h in s.history_ids)
                assert s.target_title == TITLES[s.target_id]
        if skip:
            assert len(value.splits[split]) >= 1      # the valid row before the bad ones
    else:
        assert not skip or "header" in value or "column" in value, value
        assert str(folder) in value                   # names the file


@st.composite
def info_line(draw):
    kind = draw(st.sampled_from(["ok", "no_tab", "bad_id", "dup", "empty", "extra_tabs",
                                 "non_utf8", "junk", "spaces_id", "huge_id"]))
    i = draw(st.integers(0, 30))
    return {"ok": f"Title {i}\t{i}", "no_tab": f"Title {i} {i}", "bad_id": f"T\t{i}x",
            "dup": "Abbey Road\t10", "empty": "", "extra_tabs": f"s{i}\tTitle {i}\t{i}",
            "non_utf8": None, "junk": draw(junk_text).replace("\n", " "),
            "spaces_id": f"T {i}\t {i} ", "huge_id": "T\t" + "7" * 5000}[kind] or "\xff"


@FUZZ
@given(lines=st.lists(info_line(), max_size=6), skip=st.booleans())
def test_info_files(tmp_path, lines, skip):
    text = ("".join(f"{t}\t{i}\n" for i, t in TITLES.items()) + "\n".join(lines) + "\n")
    raw = text.encode("utf-8").replace("\xff".encode("utf-8"), b"\xff")
    folder = make_folder(tmp_path, info=raw)
    kind, value = outcome(d3.read_d3, folder, skip_invalid=skip)
    if kind == "ok":
        for i, t in TITLES.items():
            assert value.catalog.titles[i] == t      # later duplicates never replace them
    else:
        assert "info.txt" in value and not skip, value


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe", b"only a title\n", b"T\tx\n",
                                     b"A\t1\nB\t1\n"])
def test_bad_info_file_alone(tmp_path, content):
    folder = make_folder(tmp_path, info=content)
    kind, msg = outcome(d3.read_d3, folder)
    assert kind == "input_error" and "info.txt" in msg


def test_folder_shapes(tmp_path):
    """Missing files, a directory where a file should be, garbage dataset.json."""
    assert outcome(d3.read_d3, tmp_path / "missing")[0] == "input_error"
    f = make_folder(tmp_path)
    (f / "valid.csv").unlink()
    assert "valid.csv" in outcome(d3.read_d3, f)[1]
    f = make_folder(tmp_path)
    (f / "dataset.json").write_bytes(b"\xff{")
    assert "dataset.json" in outcome(d3.read_d3, f)[1]
    f = make_folder(tmp_path)
    (f / "dataset.json").write_text("[1, 2]")
    assert "dataset.json" in outcome(d3.read_d3, f)[1]
    f = make_folder(tmp_path)
    (f / "dataset.json").mkdir()
    assert outcome(d3.read_d3, f)[0] == "input_error"
    f = make_folder(tmp_path, train=b"")
    assert "empty file" in outcome(d3.read_d3, f)[1]
    f = make_folder(tmp_path, train=b"user_id,item_id\n1,2\n")
    assert "missing column" in outcome(d3.read_d3, f)[1]


# --------------------------------------------------------------------------- CLI


def test_cli_bad_input_exit_2_one_line(tmp_path):
    """The command line on bad input: exit code 2, one line on stderr, no traceback, and no
    output left behind. `data inspect` on bad folders, `data prepare-amazon` on a cut file,
    `convert` and `sft` on a broken Hugging Face directory."""
    good = make_folder(tmp_path)
    broken_hf = tmp_path / "broken_hf"
    broken_hf.mkdir()
    (broken_hf / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "hidden_size": "big"}')
    (tmp_path / "cut.json.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae")
    (tmp_path / "meta.json").write_text('{"asin": "A", "title": "T"}\n')
    inspect = ["data", "inspect"]
    cases = {
        "broken_list": inspect + [str(make_folder(tmp_path, train=[
            valid_row(), {**valid_row(), "history_item_id": "[10, 11"}]))],
        "non_utf8": inspect + [str(make_folder(tmp_path, test=csv_bytes([valid_row()]) + b"\xff\xfe,1\n"))],
        "missing_column": inspect + [str(make_folder(tmp_path, valid=b"user_id,item_id\nu,10\n"))],
        "bad_info": inspect + [str(make_folder(tmp_path, info=b"Abbey Road\t10\nKind of Blue\tten\n"))],
        "no_dir": inspect + [str(tmp_path / "nope")],
        "prepare_cut_gz": ["data", "prepare-amazon", "--reviews", str(tmp_path / "cut.json.gz"),
                           "--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "out_amazon"),
                           "--quiet"],
        "convert_bad_config": ["convert", "--hf", str(broken_hf), "--out", str(tmp_path / "out_convert")],
        "sft_bad_hf_path": ["sft", "--config", os.path.join(REPO, "configs", "sft_tiny.py"),
                            f"--config.workdir={tmp_path / 'out_sft'}",
                            f"--config.model.hf_path={broken_hf}"],
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen([sys.executable, "-m", "latentr3_jax", *argv], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in {**cases, "good": inspect + [str(good)]}.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        err = err.decode("utf-8", "replace")
        if name == "good":
            assert proc.returncode == 0, err
            assert b"catalog: 5 items" in out
            continue
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        command = cases[name][0]
        assert lines and lines[-1].startswith(f"latentr3 {command}: error: "), (name, err)
        if command != "sft":        # sft also logs its progress before the error
            assert len(lines) == 1, (name, err)
    assert not (tmp_path / "out_convert").exists()
    assert not (tmp_path / "out_amazon").exists() or not any((tmp_path / "out_amazon").iterdir())


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from latentr3_jax.data import train_tokenizer
    tok = train_tokenizer(["Abbey Road", "Kind of Blue", "Blue Train"] * 20, 300)
    d = tmp_path_factory.mktemp("tok") / "tok"
    tok.save(d)
    return d


def _copy(src, root):
    dst = pathlib.Path(tempfile.mkdtemp(dir=root)) / "x"
    shutil.copytree(src, dst)
    return dst


TOK_FILES = ["tokenizer.json", "tokenizer_config.json", "latentr3_tokenizer.json"]


@FUZZ
@given(name=st.sampled_from(TOK_FILES),
       action=st.sampled_from(["delete", "truncate", "garbage", "json", "empty"]),
       frac=st.floats(0, 1), payload=literal, junk=st.binary(max_size=40))
def test_tokenizer_dirs(tmp_path, tokenizer_dir, name, action, frac, payload, junk):
    from latentr3_jax.data import load_tokenizer
    d = _copy(tokenizer_dir, tmp_path)
    p = d / name
    data = p.read_bytes()
    if action == "delete":
        p.unlink()
    elif action == "truncate":
        p.write_bytes(data[:int(len(data) * frac)])
    elif action == "garbage":
        p.write_bytes(junk)
    elif action == "json":
        if name == "tokenizer.json" or not isinstance(payload, (dict, str)):
            p.write_text(json.dumps(payload, default=str))
        else:  # special-token fields of the wrong type
            cfg = json.loads(data)
            cfg[next(k for k in ("eos_token", "pad_token") if k in cfg)] = payload
            p.write_text(json.dumps(cfg, default=str))
    elif action == "empty":
        p.write_bytes(b"")
    kind, value = outcome(load_tokenizer, d)
    if kind == "ok":
        assert value.thought_id == value.vocab_size - 1
        assert value.decode(value.encode("Abbey Road")) == "Abbey Road"


def test_tokenizer_dir_shapes(tmp_path, tokenizer_dir):
    from latentr3_jax.data import load_tokenizer
    assert outcome(load_tokenizer, tmp_path / "missing")[0] == "input_error"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert outcome(load_tokenizer, empty)[0] == "input_error"
    f = tmp_path / "a_file"
    f.write_text("x")
    assert outcome(load_tokenizer, f)[0] == "input_error"
    d = _copy(tokenizer_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").mkdir()
    assert outcome(load_tokenizer, d)[0] == "input_error"


# --------------------------------------------------------------------------- HF checkpoints


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_fixtures import make_hf_model
    return pathlib.Path(make_hf_model(tmp_path_factory.mktemp("hf"), "qwen2", tied=False))


CONFIG_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "rope_parameters", "rope_theta", "rope_scaling", "rms_norm_eps",
               "tie_word_embeddings", "max_position_embeddings", "hidden_act",
               "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
               "attention_bias", "torch_dtype"]
config_value = st.one_of(literal, st.integers(-3, 200), st.sampled_from(
    ["Qwen2ForCausalLM", ["LlamaForCausalLM"], ["GPT2LMHeadModel"], "llama", "bert",
     {"rope_type": "yarn", "factor": "x"}, {"rope_type": "nope"}, 0, -1, 10**6]))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), st.one_of(st.just("<delete>"), config_value)),
                      min_size=1, max_size=3))
def test_hf_config_mutations(tmp_path, hf_dir, edits):
    from latentr3_jax import hf
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in edits:
        if value == "<delete>":
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg, default=str))
    kind, value = outcome(hf.load_pretrained, d)
    if kind == "ok":
        config, params = value
        assert params["embed"]["embedding"].shape == (config.vocab_size, config.hidden_size)


@FUZZ
@given(target=st.sampled_from(["config.json", "model.safetensors"]),
       action=st.sampled_from(["delete", "truncate", "garbage", "flip", "json"]),
       frac=st.floats(0, 1), junk=st.binary(max_size=64), payload=literal)
def test_hf_files(tmp_path, hf_dir, target, action, frac, junk, payload):
    from latentr3_jax import hf
    d = _copy(hf_dir, tmp_path)
    p = d / target
    data = p.read_bytes()
    if action == "delete":
        p.unlink()
    elif action == "truncate":
        p.write_bytes(data[:int(len(data) * frac)])
    elif action == "garbage":
        p.write_bytes(junk)
    elif action == "flip":          # damage a span in the header or the data
        i = int((len(data) - 1) * frac)
        p.write_bytes(data[:i] + bytes(b ^ 0xFF for b in data[i:i + 8]) + data[i + 8:])
    elif action == "json":
        p.write_text(json.dumps(payload, default=str))
    outcome(hf.load_pretrained, d)


def test_hf_tensor_problems(tmp_path, hf_dir):
    """Wrong shapes, a missing or extra tensor, a broken shard index, config sizes that
    disagree with the tensors by orders of magnitude."""
    from safetensors.numpy import load_file, save_file

    from latentr3_jax import hf
    tensors = load_file(str(hf_dir / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"

    def variant(change):
        d = _copy(hf_dir, tmp_path)
        t = dict(tensors)
        change(d, t)
        if t.keys() != tensors.keys() or any(t[k] is not tensors[k] for k in t):
            save_file(t, str(d / "model.safetensors"))
        return outcome(hf.load_pretrained, d)

    kind, msg = variant(lambda d, t: t.__setitem__(name, t[name][:, :-1]))
    assert kind == "input_error" and "shape" in msg and name in msg
    kind, msg = variant(lambda d, t: t.pop(name))
    assert kind == "input_error" and "missing tensor" in msg
    kind, msg = variant(lambda d, t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
    assert kind == "input_error" and "unexpected tensor" in msg

    def huge(d, t):
        cfg = json.loads((d / "config.json").read_text())
        cfg["vocab_size"] = 10**11
        (d / "config.json").write_text(json.dumps(cfg))
    kind, msg = variant(huge)
    assert kind == "input_error" and "shape" in msg

    def index(d, t):
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "missing.safetensors"}}')
    assert "missing" in variant(index)[1]

    def index_junk(d, t):
        (d / "model.safetensors.index.json").write_text('[1, 2]')
    assert variant(index_junk)[0] == "input_error"


# --------------------------------------------------------------------------- writers


class DiskFull:
    """Patch os.fdopen so that files opened for writing fail half way through a write."""

    def __init__(self, monkeypatch, fail_on: int = 1):
        self.count = 0
        self.fail_on = fail_on
        real = os.fdopen

        def fdopen(fd, mode="r", *a, **kw):
            f = real(fd, mode, *a, **kw)
            if "w" not in mode:
                return f
            self.count += 1
            if self.count < self.fail_on:
                return f
            write = f.write

            def half_write(data):
                write(data[:max(len(data) // 2, 1)])
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            f.write = half_write
            return f
        monkeypatch.setattr(os, "fdopen", fdopen)


def _leftovers(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*")
                  if p.name.startswith(".") or "tmp" in p.name or "partial" in p.name)


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in pathlib.Path(folder).rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("fail_on", [1, 2, 4])
def test_write_d3_interrupted(tmp_path, monkeypatch, fail_on):
    ds = d3.read_d3(make_folder(tmp_path, train=[valid_row(), valid_row(hist=(13,), target=14)]))
    out = tmp_path / "out"
    d3.write_d3(out, ds.catalog, ds.splits)
    before = _snapshot(out)
    smaller = {k: v[:1] for k, v in ds.splits.items()}
    DiskFull(monkeypatch, fail_on)
    with pytest.raises(OSError, match="injected"):
        d3.write_d3(out, ds.catalog, smaller)
    monkeypatch.undo()
    assert _leftovers(out) == []
    after = _snapshot(out)
    assert set(after) == set(before)
    # every file is either the old one or the complete new one, never half of either
    for name, data in after.items():
        assert data == before[name] or data.count(b"\n") >= 2
    d3.read_d3(out)


def test_prepare_amazon_interrupted(tmp_path, monkeypatch):
    from test_data_amazon import _raw

    from latentr3_jax.data import amazon
    rp, mp, _, _ = _raw(tmp_path)
    out = tmp_path / "out"
    DiskFull(monkeypatch, fail_on=2)
    with pytest.raises(OSError, match="injected"):
        amazon.prepare_amazon(rp, mp, out, min_items=8, verbose=False)
    monkeypatch.undo()
    assert _leftovers(out) == []
    for p in out.glob("*"):        # files written before the fault are whole
        if p.suffix == ".csv":
            d3.read_split(p, d3.Catalog({}), skip_invalid=True)


def test_atomic_open_keeps_old_file(tmp_path):
    from latentr3_jax.utils.atomic import atomic_open, atomic_write_text
    target = tmp_path / "metrics.json"
    atomic_write_text(str(target), '{"old": 1}\n')
    with pytest.raises(RuntimeError):
        with atomic_open(str(target)) as f:
            f.write('{"new": ')
            raise RuntimeError("crash mid-write")
    assert target.read_text() == '{"old": 1}\n' and _leftovers(tmp_path) == []


def test_run_json_and_eval_metrics_interrupted(tmp_path, monkeypatch):
    """config.json / model_config.json (jsonio.write_json) and evaluation's metrics.json go
    through atomic_write_text: a fault mid-write keeps the previous file."""
    import inspect

    from latentr3_jax.eval import evaluate
    from latentr3_jax.utils.jsonio import write_json
    write_json(str(tmp_path / "config.json"), {"a": 1})
    DiskFull(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        write_json(str(tmp_path / "config.json"), {"a": 2, "b": list(range(100))})
    monkeypatch.undo()
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []
    src = inspect.getsource(evaluate)
    assert "atomic_write_text(os.path.join(out_dir, METRICS)" in src


def _tiny_params():
    import jax

    from latentr3_jax.model import decoder, latent
    from latentr3_jax.model.config import tiny_config
    config = tiny_config(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1)
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    params["latent"] = latent.init_latent_params(config, jax.random.PRNGKey(1))
    return config, jax.device_get(params)


@pytest.mark.parametrize("which", ["model", "latent"])
def test_save_pretrained_interrupted(tmp_path, monkeypatch, which):
    from latentr3_jax import hf
    config, params = _tiny_params()
    out = tmp_path / "hf"
    hf.save_pretrained(config, params, str(out))
    before = _snapshot(out)
    real = hf.save_file
    calls = []

    def failing(tensors, filename, *a, **kw):
        calls.append(filename)
        if (which == "model") == (len(calls) == 1):
            real(tensors, filename, *a, **kw)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(tensors, filename, *a, **kw)
    monkeypatch.setattr(hf, "save_file", failing)
    bumped = {**params, "final_norm": {"scale": params["final_norm"]["scale"] + 1}}
    with pytest.raises(OSError, match="injected"):
        hf.save_pretrained(config, bumped, str(out))
    monkeypatch.undo()
    assert _leftovers(out) == []
    after = _snapshot(out)
    assert set(after) == set(before)
    config2, params2 = hf.load_pretrained(str(out))   # still loads: each file whole
    assert config2 == config


def test_save_params_interrupted(tmp_path, monkeypatch):
    from latentr3_jax.model import params_io
    config, params = _tiny_params()
    out = tmp_path / "ckpt"
    params_io.save_params(str(out), params, config)
    before = _snapshot(out)
    real_dump = json.dump

    def failing(obj, f, *a, **kw):
        f.write(json.dumps(obj)[:10])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    monkeypatch.setattr(params_io.json, "dump", failing)
    with pytest.raises(OSError, match="injected"):
        params_io.save_params(str(out), params, config, overwrite=True)
    monkeypatch.setattr(params_io.json, "dump", real_dump)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]    # no .ckpt.partial / .ckpt.old


def test_metrics_line_cut_by_a_crash(tmp_path):
    """A metrics.jsonl line cut by SIGKILL costs that line only, not the next run's first."""
    from latentr3_jax.train import runs
    w = runs.MetricsWriter(str(tmp_path))
    w.write({"split": "train", "step": 1})
    w.close()
    with open(tmp_path / runs.METRICS, "a") as f:
        f.write('{"split": "train", "st')           # the process died here
    w = runs.MetricsWriter(str(tmp_path))
    w.write({"split": "train", "step": 2})
    w.close()
    assert [r["step"] for r in runs.read_metrics(str(tmp_path))] == [1, 2]
