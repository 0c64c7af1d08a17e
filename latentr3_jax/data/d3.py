"""Reader and writer for D3-format recommendation datasets (SPEC.md section 2).

A D3 folder holds `train.csv`, `valid.csv`, `test.csv` and an item info file
(`info.txt`, one item per line, tab separated; the last field is the integer item id
and the field before it the title, so both `title\\tid` and `sid\\ttitle\\tid` work).
Each CSV row is one (history -> next item) sample; list columns are Python list
literals, parsed with `ast.literal_eval` and then checked to hold only str/int values.

Bad input never passes silently: every problem raises `InputError` naming file,
1-based line and field, or, with `skip_invalid=True`, the row is dropped and counted
by reason in `Dataset.report`.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import json
import pathlib
from typing import Iterable, Iterator, Optional, Sequence

from latentr3_jax.errors import InputError, where
from latentr3_jax.utils.atomic import atomic_files

SPLITS = ("train", "valid", "test")
INFO_FILES = ("info.txt", "item_info.txt", "items.txt")
REQUIRED_COLUMNS = ("history_item_title", "history_item_id", "item_title", "item_id")
MAX_LIST_CHARS = 1_000_000
META_FILE = "dataset.json"     # optional: {"name": ..., "category_word": ...}

# Written by `write_d3` (the CDs layout's column names, minus ASINs/ratings).
D3_COLUMNS = ("user_id", "history_item_id", "item_id", "history_item_title", "item_title",
              "history_timestamp", "timestamp")

# Category words of the original prompts (SPEC.md section 3).
CATEGORY_WORDS = {
    "CDs_and_Vinyl": "musics",
    "Toys_and_Games": "toys and games",
    "Video_Games": "video games",
    "Musical_Instruments": "music instruments",
}


def category_word(name: str) -> str:
    """Word the prompt uses for a dataset: the release's, else a readable lower-case name."""
    if name in CATEGORY_WORDS:
        return CATEGORY_WORDS[name]
    return " ".join(name.replace("_", " ").replace("-", " ").split()).lower()


def normalize_title(title: str) -> str:
    """Light normalisation used to compare a CSV title with the catalog's (outer/inner runs
    of white space). The real files match exactly; this only forgives white-space noise."""
    return " ".join(title.split())


@dataclasses.dataclass
class Catalog:
    """Item id -> title, and title -> ids (titles are not unique; all ids are kept)."""

    titles: dict
    title_to_ids: dict = dataclasses.field(default_factory=dict)
    ids: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.ids = sorted(self.titles)
        t2i = {}
        for i in self.ids:
            t2i.setdefault(self.titles[i], []).append(i)
        self.title_to_ids = t2i

    def __len__(self) -> int:
        return len(self.titles)

    def __contains__(self, item_id) -> bool:
        return item_id in self.titles


@dataclasses.dataclass(frozen=True)
class Sample:
    """One (history -> next item) row; `line` is its 1-based line in the CSV."""

    user_id: Optional[str]
    history_ids: tuple
    history_titles: tuple
    target_id: int
    target_title: str
    line: int = 0
    timestamp: Optional[int] = None
    history_timestamps: Optional[tuple] = None


@dataclasses.dataclass
class ReadReport:
    """What reading skipped: counts per reason, and the first messages."""

    skipped: dict = dataclasses.field(default_factory=dict)
    rows: dict = dataclasses.field(default_factory=dict)
    examples: list = dataclasses.field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(message)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        rows = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        if not self.skipped:
            return f"rows: {rows}; nothing skipped"
        sk = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return f"rows: {rows}; skipped: {sk}"


@dataclasses.dataclass
class Dataset:
    name: str
    category_word: str
    catalog: Catalog
    splits: dict
    report: ReadReport = dataclasses.field(default_factory=ReadReport)
    folder: Optional[str] = None


class _RowError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------- low-level parsing

def _decoded_lines(path: pathlib.Path, on_bad) -> Iterator[tuple]:
    """(1-based line number, text) for each line; undecodable lines go to `on_bad`."""
    try:
        f = open(path, "rb")
    except OSError as e:  # a directory, no permission, ...
        raise InputError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    with f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_bad(_RowError("non_utf8",
                                 f"{where(path, n)}: byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1} is not valid UTF-8"))


def parse_list(text: str, kind: type, path, line, field) -> list:
    """A Python list literal of `kind` (int or str) values; nothing is evaluated."""
    def bad(why):
        return _RowError("malformed_list", f"{where(path, line, field)}: {why}: {text[:80]!r}")

    s = text.strip()
    if not (s.startswith("[") and s.endswith("]")):
        raise bad("not a list literal")
    if len(s) > MAX_LIST_CHARS:
        raise bad("list literal too long")
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        raise bad("malformed list literal") from None
    if not isinstance(value, list):
        raise bad("not a list literal")
    for v in value:
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("list holds a non-integer")
        elif not isinstance(v, str):
            raise bad("list holds a non-string")
    return value


def _parse_int(text, path, line, field) -> int:
    try:
        s = text.strip()
        if not s.lstrip("-").isdigit():
            raise ValueError
        return int(s)
    except (ValueError, AttributeError):
        raise _RowError("bad_id", f"{where(path, line, field)}: not an integer: {str(text)[:40]!r}") from None


# ---------------------------------------------------------------- info file

def find_info_file(folder: pathlib.Path) -> pathlib.Path:
    for name in INFO_FILES:
        if (folder / name).exists():
            return folder / name
    raise InputError(f"{folder}: no item info file (looked for {', '.join(INFO_FILES)})")


def read_info(path, skip_invalid: bool = False, report: Optional[ReadReport] = None) -> Catalog:
    """Catalog from an info file: `title\\tid` or `sid\\ttitle\\tid` per line."""
    path = pathlib.Path(path)
    report = report if report is not None else ReadReport()

    def fail(err: _RowError):
        if not skip_invalid:
            raise InputError(err.message)
        report.add("info_" + err.reason, err.message)

    titles = {}
    for n, text in _decoded_lines(path, fail):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        parts = text.split("\t")
        try:
            if len(parts) < 2:
                raise _RowError("missing_field", f"{where(path, n, 'title')}: expected 'title<TAB>id', "
                                                 "found no tab")
            item_id = _parse_int(parts[-1], path, n, "id")
            if item_id in titles:
                raise _RowError("duplicate_id", f"{where(path, n, 'id')}: item id {item_id} "
                                                "appears twice")
        except _RowError as e:
            fail(e)
            continue
        titles[item_id] = parts[-2]
    if not titles:
        raise InputError(f"{path}: the item info file holds no items")
    return Catalog(titles)


# ---------------------------------------------------------------- CSV splits

def _check_row(row: dict, path, line, catalog: Catalog) -> Sample:
    for col in REQUIRED_COLUMNS:
        if row.get(col) is None:
            raise _RowError("missing_field", f"{where(path, line, col)}: the row has too few fields")
    h_ids = parse_list(row["history_item_id"], int, path, line, "history_item_id")
    h_titles = parse_list(row["history_item_title"], str, path, line, "history_item_title")
    if not h_ids:
        raise _RowError("empty_history", f"{where(path, line, 'history_item_id')}: empty history")
    if len(h_ids) != len(h_titles):
        raise _RowError("length_mismatch",
                        f"{where(path, line, 'history_item_title')}: {len(h_titles)} titles for "
                        f"{len(h_ids)} history ids")
    target_id = _parse_int(row["item_id"], path, line, "item_id")
    target_title = row["item_title"]
    pairs = [(i, t, "history_item_id", "history_item_title") for i, t in zip(h_ids, h_titles)]
    pairs.append((target_id, target_title, "item_id", "item_title"))
    for item_id, title, id_field, title_field in pairs:
        if item_id not in catalog.titles:
            raise _RowError("unknown_id", f"{where(path, line, id_field)}: item id {item_id} is not "
                                          "in the catalog")
        if normalize_title(title) != normalize_title(catalog.titles[item_id]):
            raise _RowError("title_mismatch",
                            f"{where(path, line, title_field)}: title {title[:60]!r} of item {item_id} "
                            f"disagrees with the catalog's {catalog.titles[item_id][:60]!r}")
    ts, h_ts = None, None
    if row.get("timestamp") not in (None, ""):
        try:
            ts = int(float(row["timestamp"]))
        except (ValueError, OverflowError):
            ts = None
    if row.get("history_timestamp") not in (None, ""):
        try:
            h_ts = tuple(int(float(v)) for v in ast.literal_eval(row["history_timestamp"].strip()))
        except (ValueError, SyntaxError, TypeError, OverflowError, RecursionError, MemoryError):
            h_ts = None
    user = row.get("user_id")
    return Sample(user_id=user if user not in (None, "") else None,
                  history_ids=tuple(h_ids),
                  history_titles=tuple(catalog.titles[i] for i in h_ids),
                  target_id=target_id, target_title=catalog.titles[target_id], line=line,
                  timestamp=ts, history_timestamps=h_ts)


def read_split(path, catalog: Catalog, skip_invalid: bool = False,
               report: Optional[ReadReport] = None) -> list:
    """Samples of one CSV split, checked against the catalog."""
    path = pathlib.Path(path)
    report = report if report is not None else ReadReport()

    def fail(err: _RowError):
        if not skip_invalid:
            raise InputError(err.message)
        report.add(err.reason, err.message)

    consumed = []          # real line numbers of the lines the csv reader pulled

    def lines():
        for n, text in _decoded_lines(path, fail):
            consumed.append(n)
            yield text

    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{where(path, 1)}: empty file (no header)") from None
    except csv.Error as e:
        raise InputError(f"{where(path, 1)}: {e}") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{where(path, 1, missing[0])}: missing column (the header has "
                         f"{', '.join(header)})")
    samples = []
    while True:
        consumed.clear()
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            fail(_RowError("csv_syntax", f"{where(path, consumed[0] if consumed else None)}: {e}"))
            continue
        line = consumed[0] if consumed else None
        if not fields or all(not f.strip() for f in fields):
            continue
        row = dict(zip(header, fields))
        try:
            samples.append(_check_row(row, path, line, catalog))
        except _RowError as e:
            fail(e)
    report.rows[path.stem] = len(samples)
    return samples


def read_d3(folder, skip_invalid: bool = False, *, name: Optional[str] = None,
            category: str = "", splits: Sequence[str] = SPLITS) -> Dataset:
    """Read a D3-format folder: the catalog and the train/valid/test samples."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    report = ReadReport()
    catalog = read_info(find_info_file(folder), skip_invalid, report)
    out = {}
    for split in splits:
        path = folder / f"{split}.csv"
        if not path.exists():
            raise InputError(f"{path}: missing split file")
        out[split] = read_split(path, catalog, skip_invalid, report)
    meta = read_dataset_meta(folder)
    name = name or meta.get("name") or folder.resolve().name
    category = category or meta.get("category_word", "")
    return Dataset(name=name, category_word=category or category_word(name), catalog=catalog,
                   splits=out, report=report, folder=str(folder))


def read_dataset_meta(folder) -> dict:
    """Optional `dataset.json` of a folder: {"name": ..., "category_word": ...}."""
    p = pathlib.Path(folder) / META_FILE
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{p}: expected a JSON object")
    return meta


# ---------------------------------------------------------------- writing

def csv_text(rows: Iterable[Sequence], header: Sequence[str]) -> str:
    """CSV text with the header row (quoting as the csv module does)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_d3(folder, catalog: Catalog, splits: dict) -> None:
    """Write `info.txt` and the split CSVs (CDs-style columns); they replace an earlier
    version of the folder together, so an interrupted write leaves it as it was."""
    folder = pathlib.Path(folder)
    for t in catalog.titles.values():
        if "\t" in t or "\n" in t or "\r" in t:
            raise InputError(f"title {t[:60]!r} holds a tab or newline; it cannot go in info.txt")
    info = "".join(f"{catalog.titles[i]}\t{i}\n" for i in catalog.ids)
    with atomic_files(folder) as fs:
        for split, samples in splits.items():
            rows = []
            for s in samples:
                h_ts = list(s.history_timestamps) if s.history_timestamps is not None else ""
                rows.append([s.user_id or "", str(list(s.history_ids)), s.target_id,
                             str(list(s.history_titles)), s.target_title, h_ts,
                             "" if s.timestamp is None else s.timestamp])
            fs.write_text(f"{split}.csv", csv_text(rows, D3_COLUMNS))
        fs.write_text("info.txt", info)
