"""TFDS (array_record, no TensorFlow) round trip: the same samples as the CSV reader."""

import sys

import pytest

from latentr3_jax.config import base_config
from latentr3_jax.data import load_dataset, read_d3
from latentr3_jax.cli import cmd_data as data_main
from latentr3_jax.data.synthetic import write_synthetic
from latentr3_jax.errors import InputError

pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "Video_Games", num_items=120, num_users=60, seed=5)


def test_round_trip_through_cli_and_load_dataset(src, tmp_path, capsys):
    assert "tensorflow" not in sys.modules or "tensorflow_datasets" in sys.modules
    out = tmp_path / "tfds"
    assert data_main(["build-tfds", "--src", str(src), "--data-dir", str(out)]) == 0
    assert "d3_recommendation/synthetic/1.0.0" in capsys.readouterr().out
    assert list((out / "d3_recommendation" / "synthetic" / "1.0.0").glob("*.array_record-*"))
    want = read_d3(src)
    cfg = base_config()
    cfg.dataset, cfg.dataset_dir = "tfds", str(out)
    got = load_dataset(cfg)
    assert got.name == want.name and got.category_word == want.category_word == "albums"
    assert got.catalog.titles == want.catalog.titles
    for split in ("train", "valid", "test"):
        assert got.splits[split] == want.splits[split]       # same samples, same order
    import tensorflow_datasets as tfds
    assert "tensorflow" not in sys.modules                   # really no TF underneath
    ds = tfds.data_source("d3_recommendation/synthetic", data_dir=str(out))
    assert len(ds["test"]) == len(want.splits["test"])
    # inspect reads the tfds output too
    assert data_main(["inspect", str(out)]) == 0
    assert f"test {len(want.splits['test'])}" in " ".join(capsys.readouterr().out.split())


def test_missing_or_ambiguous(src, tmp_path):
    cfg = base_config()
    cfg.dataset, cfg.dataset_dir = "tfds", str(tmp_path / "empty")
    with pytest.raises(InputError, match="no d3_recommendation dataset"):
        load_dataset(cfg)
    from latentr3_jax.data.tfds_builder import build_tfds, read_tfds
    build_tfds(src, tmp_path / "two", name="first")
    build_tfds(src, tmp_path / "two", name="second")
    with pytest.raises(InputError, match="several datasets"):
        read_tfds(tmp_path / "two")
    assert read_tfds(tmp_path / "two", name="second").name == "second"


def test_rebuild_replaces_old_rows(tmp_path):
    from latentr3_jax.data.tfds_builder import build_tfds, read_tfds
    a = write_synthetic(tmp_path / "a", num_items=100, num_users=30, seed=1)
    build_tfds(a, tmp_path / "out")
    b = write_synthetic(tmp_path / "a", num_items=100, num_users=40, seed=2)
    build_tfds(b, tmp_path / "out")
    assert read_tfds(tmp_path / "out").splits == read_d3(b).splits
