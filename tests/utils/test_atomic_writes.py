"""Writers of several files (HF export, D3 folders) replace them together: an export that
fails or is killed part-way leaves the earlier version of the folder whole."""

import os

import jax
import numpy as np
import pytest

from latentr3_jax import hf
from latentr3_jax.data import d3
from latentr3_jax.model import init_latent_params, init_params, tiny_config
from latentr3_jax.utils import atomic


def _listing(folder):
    return sorted(os.listdir(folder))


def test_file_set_commits_all_or_nothing(tmp_path):
    with atomic.atomic_files(tmp_path) as fs:
        fs.write_text("a.txt", "a1")
        fs.write_text("b.txt", "b1")
        assert _listing(tmp_path) != ["a.txt", "b.txt"]  # nothing in place before the end
    assert _listing(tmp_path) == ["a.txt", "b.txt"]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_files(tmp_path) as fs:
            fs.write_text("a.txt", "a2")
            with open(fs.temp_path("c.bin"), "wb") as f:
                f.write(b"\0" * 10)
            raise RuntimeError("boom")
    assert _listing(tmp_path) == ["a.txt", "b.txt"]       # no temp files left behind
    assert (tmp_path / "a.txt").read_text() == "a1"


def _model(seed, latent=True):
    config = tiny_config(vocab_size=64, hidden_size=16, intermediate_size=32, num_heads=2,
                         num_kv_heads=1)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(config, k1)
    if latent:
        params["latent"] = init_latent_params(config, k2)
    return config, params


def test_interrupted_hf_export_keeps_the_previous_one(tmp_path, monkeypatch):
    config, old = _model(0)
    hf.save_pretrained(config, old, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)}
    assert {"model.safetensors", hf.LATENT_FILE, "config.json"} <= set(before)

    # the second export dies while writing its second file (the latent weights)
    real = hf.save_file
    calls = []

    def dying(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", dying)
    _, new = _model(1)
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(config, new, tmp_path)
    monkeypatch.setattr(hf, "save_file", real)
    assert {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)} == before
    _, back = hf.load_pretrained(tmp_path)
    np.testing.assert_array_equal(back["embed"]["embedding"], old["embed"]["embedding"])

    # a complete export replaces all of it; without a latent module the old file goes
    hf.save_pretrained(config, {k: v for k, v in new.items() if k != "latent"}, tmp_path)
    _, back = hf.load_pretrained(tmp_path)
    np.testing.assert_array_equal(back["embed"]["embedding"], new["embed"]["embedding"])
    assert not (tmp_path / hf.LATENT_FILE).exists() and "latent" not in back


def test_interrupted_d3_write_keeps_the_previous_folder(tmp_path, monkeypatch):
    titles = ["Abbey Road", "Blue", "Kind of Blue", "Low"]
    cat = d3.Catalog({i: t for i, t in enumerate(titles)})
    rows = [d3.Sample("u", tuple(range(k)), tuple(titles[:k]), k, titles[k], line=k + 1)
            for k in range(1, len(titles))]
    d3.write_d3(tmp_path, cat, {s: rows for s in d3.SPLITS})
    before = {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)}

    real = d3.csv_text
    calls = []

    def dying(rows, columns):
        calls.append(1)
        if len(calls) == 2:  # after train.csv is written, before the rest
            raise OSError("disk full")
        return real(rows, columns)

    monkeypatch.setattr(d3, "csv_text", dying)
    with pytest.raises(OSError, match="disk full"):
        d3.write_d3(tmp_path, cat, {s: rows[:1] for s in d3.SPLITS})
    assert {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)} == before
    assert d3.read_d3(tmp_path).splits["train"] == rows
