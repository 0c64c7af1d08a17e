"""TensorFlow Datasets form of a D3 folder, written and read without TensorFlow.

`build_tfds(src, data_dir)` runs a `GeneratorBasedBuilder` with
`file_format="array_record"`, giving `<data_dir>/d3_recommendation/<config>/1.0.0/`.
Without TensorFlow only that file format and the random-access `data_source` reader
work (tfds imports `importlib_resources`, which must be installed). Splits are
train/valid/test plus `catalog` (one row per item, empty history). tfds shuffles rows
while writing, so every row carries `index` (its position in the CSV) and the reader
sorts by it: reading back gives the same samples, in the same order, as `read_d3`.
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional

import numpy as np

from latentr3_jax.data.d3 import SPLITS, Catalog, Dataset, ReadReport, Sample, category_word, read_d3
from latentr3_jax.errors import InputError

BUILDER_NAME = "d3_recommendation"
VERSION = "1.0.0"


def _tfds():
    try:
        import tensorflow_datasets as tfds   # start-up cost (TensorFlow): only the tfds path
    except ImportError as e:  # importlib_resources is a hidden dependency of tfds
        raise InputError(f"tensorflow_datasets cannot be imported ({e}); install "
                         "tensorflow-datasets, array_record and importlib_resources") from None
    return tfds


def config_name(name: str) -> str:
    """A tfds config name from a dataset name ('CDs_and_Vinyl' -> 'cds_and_vinyl')."""
    s = re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_").lower()
    return s or "dataset"


_BUILDER_CLASS = None


def _builder_class():
    """Defined lazily so that importing this module does not import tfds."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS
    tfds = _tfds()

    class D3Recommendation(tfds.core.GeneratorBasedBuilder):
        """Sequential recommendation samples (history -> next item) of a D3 folder."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "D3 folder with train/valid/test and the item catalog."}

        def __init__(self, *, dataset: Optional[Dataset] = None, **kwargs):
            self._dataset = dataset
            super().__init__(**kwargs)

        def _info(self):
            f = tfds.features
            meta = {}
            if self._dataset is not None:
                meta = {"name": self._dataset.name, "category_word": self._dataset.category_word}
            return tfds.core.DatasetInfo(
                builder=self,
                description="Sequential recommendation samples from a D3-format folder.",
                features=f.FeaturesDict({
                    "index": np.int64, "line": np.int64, "user_id": f.Text(),
                    "history_ids": f.Sequence(np.int64), "history_titles": f.Sequence(f.Text()),
                    "item_id": np.int64, "item_title": f.Text(), "timestamp": np.int64,
                    "history_timestamps": f.Sequence(np.int64),
                }),
                metadata=tfds.core.MetadataDict(meta),
            )

        def _split_generators(self, dl_manager):
            if self._dataset is None:
                raise InputError("this builder only writes from a D3 folder (build_tfds)")
            out = {s: self._generate_examples(s) for s in SPLITS}
            out["catalog"] = self._generate_examples("catalog")
            return out

        def _generate_examples(self, split):
            ds = self._dataset
            if split == "catalog":
                for k, i in enumerate(ds.catalog.ids):
                    yield k, {"index": k, "line": 0, "user_id": "", "history_ids": [],
                              "history_titles": [], "item_id": i,
                              "item_title": ds.catalog.titles[i], "timestamp": -1,
                              "history_timestamps": []}
                return
            for k, s in enumerate(ds.splits[split]):
                yield k, {"index": k, "line": s.line, "user_id": s.user_id or "",
                          "history_ids": list(s.history_ids),
                          "history_titles": list(s.history_titles),
                          "item_id": s.target_id, "item_title": s.target_title,
                          "timestamp": -1 if s.timestamp is None else s.timestamp,
                          "history_timestamps": list(s.history_timestamps or [])}

    _BUILDER_CLASS = D3Recommendation
    return D3Recommendation


def build_tfds(src, data_dir, *, name: Optional[str] = None, skip_invalid: bool = False) -> pathlib.Path:
    """Read a D3 folder and write it as a TFDS (array_record) dataset; returns its directory."""
    dataset = read_d3(src, skip_invalid=skip_invalid, name=name)
    cls = _builder_class()
    tfds = _tfds()
    builder = cls(dataset=dataset, data_dir=str(data_dir), file_format="array_record",
                  config=tfds.core.BuilderConfig(name=config_name(dataset.name),
                                                 version=VERSION))
    # FORCE_REDOWNLOAD regenerates an existing version, so a rebuild never serves stale rows.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
    return pathlib.Path(builder.data_dir)


def find_tfds_dirs(data_dir) -> list:
    """Version directories of d3_recommendation datasets under a tfds data_dir."""
    root = pathlib.Path(data_dir)
    if (root / "dataset_info.json").exists():
        return [root]
    return sorted(p.parent for p in root.glob(f"{BUILDER_NAME}/*/*/dataset_info.json"))


def read_tfds(data_dir, name: str = "") -> Dataset:
    """The Dataset stored under a tfds data_dir (or a dataset version directory)."""
    tfds = _tfds()
    dirs = find_tfds_dirs(data_dir)
    if name:
        dirs = [d for d in dirs if d.parent.name == config_name(name)]
    if not dirs:
        raise InputError(f"{data_dir}: no {BUILDER_NAME} dataset{' ' + name if name else ''} found "
                         "(build one with `latentr3 data build-tfds`)")
    if len(dirs) > 1:
        raise InputError(f"{data_dir}: several datasets ({', '.join(d.parent.name for d in dirs)}); "
                         "choose one with data.tfds_name")
    builder = tfds.builder_from_directory(str(dirs[0]))
    meta = dict(builder.info.metadata or {})
    sources = builder.as_data_source()

    def rows(split):
        src = sources[split]
        got = [src[i] for i in range(len(src))]
        got.sort(key=lambda r: int(r["index"]))
        return got

    def text(v):
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    catalog = Catalog({int(r["item_id"]): text(r["item_title"]) for r in rows("catalog")})
    splits = {}
    for split in SPLITS:
        out = []
        for r in rows(split):
            ts = int(r["timestamp"])
            h_ts = tuple(int(x) for x in r["history_timestamps"])
            out.append(Sample(user_id=text(r["user_id"]) or None,
                              history_ids=tuple(int(x) for x in r["history_ids"]),
                              history_titles=tuple(text(x) for x in r["history_titles"]),
                              target_id=int(r["item_id"]), target_title=text(r["item_title"]),
                              line=int(r["line"]), timestamp=None if ts < 0 else ts,
                              history_timestamps=h_ts or None))
        splits[split] = out
    name = meta.get("name") or dirs[0].parent.name
    report = ReadReport(rows={s: len(v) for s, v in splits.items()})
    return Dataset(name=name, category_word=meta.get("category_word") or category_word(name),
                   catalog=catalog, splits=splits, report=report, folder=str(dirs[0]))
