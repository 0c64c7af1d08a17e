"""D3 reader: both layouts, every bad-input case, skip_invalid reports, the real datasets."""

import csv
import io
import pathlib

import pytest

from conftest import amazon_dir
from latentr3_jax.data import d3
from latentr3_jax.cli import cmd_data as data_main
from latentr3_jax.errors import InputError

TITLES = {0: "Greatest Hits", 1: "Blue Train", 2: "Greatest Hits", 3: 'Say "Hi" & Bye', 4: "Kind of Blue"}
ROWS = [  # user, history ids, target id
    ("u1", [0], 1),
    ("u1", [0, 1], 3),
    ("u2", [4, 2, 3], 0),
]


def _write(folder: pathlib.Path, layout: str = "cds", rows=ROWS, titles=TITLES, edit=None):
    """A tiny D3 folder. layout 'cds' (title\\tid, CDs columns) or 'minionerec'."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "cds":
        info = "".join(f"{t}\t{i}\n" for i, t in titles.items())
        header = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id",
                  "history_item_title", "item_title", "history_rating", "rating",
                  "history_timestamp", "timestamp"]
    else:
        info = "".join(f"<a_{i}><b_1>\t{t}\t{i}\n" for i, t in titles.items())
        header = ["user_id", "history_item_title", "item_title", "history_item_id", "item_id",
                  "history_item_sid", "item_sid"]
    (folder / "info.txt").write_text(info, encoding="utf-8")
    for split in d3.SPLITS:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for user, hist, tgt in rows:
            vals = {"user_id": user, "item_asins": str([f"B{h}" for h in hist]), "item_asin": f"B{tgt}",
                    "history_item_id": str(hist), "item_id": tgt,
                    "history_item_title": str([titles[h] for h in hist]), "item_title": titles[tgt],
                    "history_rating": str([5.0] * len(hist)), "rating": 5.0,
                    "history_timestamp": str([100 + k for k in range(len(hist))]), "timestamp": 200,
                    "history_item_sid": str(["<a_1>"] * len(hist)), "item_sid": "<a_1>"}
            w.writerow([vals[h] for h in header])
        text = buf.getvalue()
        if edit and split == "valid":
            text = edit(text)
        (folder / f"{split}.csv").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("layout", ["cds", "minionerec"])
def test_reads_both_layouts(tmp_path, layout):
    ds = d3.read_d3(_write(tmp_path / "Office_Products", layout))
    assert ds.category_word == "office products"
    assert len(ds.catalog) == 5 and ds.catalog.ids == [0, 1, 2, 3, 4]
    assert ds.catalog.title_to_ids["Greatest Hits"] == [0, 2]     # duplicates kept
    assert ds.catalog.titles[3] == 'Say "Hi" & Bye'
    for split in d3.SPLITS:
        got = [(s.user_id, list(s.history_ids), s.target_id) for s in ds.splits[split]]
        assert got == [(u, h, t) for u, h, t in ROWS]
        assert [s.line for s in ds.splits[split]] == [2, 3, 4]
    s = ds.splits["test"][2]
    assert s.history_titles == ("Kind of Blue", "Greatest Hits", 'Say "Hi" & Bye')
    assert s.target_title == "Greatest Hits"
    assert ds.report.total_skipped == 0


def test_category_words():
    assert d3.category_word("CDs_and_Vinyl") == "musics"
    assert d3.category_word("Toys_and_Games") == "toys and games"
    assert d3.category_word("Video_Games") == "video games"
    assert d3.category_word("Musical_Instruments") == "music instruments"
    assert d3.category_word("Industrial_and_Scientific") == "industrial and scientific"


def _replace_line(n, new):
    def edit(text):
        lines = text.split("\n")
        lines[n - 1] = new(lines[n - 1])
        return "\n".join(lines)
    return edit


BAD_CASES = {
    # name: (edit of valid.csv, reason, field named in the message)
    "malformed_list": (_replace_line(3, lambda l: l.replace('"[0, 1]"', '"[0, 1"')),
                       "malformed_list", "history_item_id"),
    "not_a_literal_call": (_replace_line(3, lambda l: l.replace('"[0, 1]"', "\"[__import__('os').getpid()]\"")),
                           "malformed_list", "history_item_id"),
    "float_in_id_list": (_replace_line(3, lambda l: l.replace('"[0, 1]"', '"[0, 1.5]"')),
                         "malformed_list", "history_item_id"),
    "unknown_history_id": (_replace_line(3, lambda l: l.replace('"[0, 1]"', '"[0, 77]"')),
                           "unknown_id", "history_item_id"),
    "unknown_target_id": (_replace_line(3, lambda l: l.replace(",3,", ",99,")),
                          "unknown_id", "item_id"),
    "title_mismatch": (_replace_line(3, lambda l: l.replace("'Blue Train'", "'Red Train'")),
                       "title_mismatch", "history_item_title"),
    "target_title_mismatch": (_replace_line(3, lambda l: l.replace('""Hi"" & Bye', '""Hello"" & Bye')),
                              "title_mismatch", "item_title"),
    "empty_history": (_replace_line(3, lambda l: l.replace('"[0, 1]"', "[]").replace(
        "\"['Greatest Hits', 'Blue Train']\"", "[]")), "empty_history", "history_item_id"),
    "length_mismatch": (_replace_line(3, lambda l: l.replace("'Greatest Hits', 'Blue Train'", "'Greatest Hits'")),
                        "length_mismatch", "history_item_title"),
    "bad_target_id": (_replace_line(3, lambda l: l.replace(",3,", ",three,")), "bad_id", "item_id"),
    "too_few_fields": (_replace_line(3, lambda l: "u1,x"), "missing_field", "history_item_title"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_raise_or_are_counted(tmp_path, case):
    edit, reason, field = BAD_CASES[case]
    folder = _write(tmp_path / "CDs_and_Vinyl", edit=edit)
    with pytest.raises(InputError) as e:
        d3.read_d3(folder)
    msg = str(e.value)
    assert f"valid.csv:3 field {field!r}" in msg, msg
    assert "\n" not in msg
    ds = d3.read_d3(folder, skip_invalid=True)
    assert ds.report.skipped == {reason: 1}
    assert [s.line for s in ds.splits["valid"]] == [2, 4]
    assert len(ds.splits["train"]) == 3 and ds.report.rows["valid"] == 2


def test_whitespace_noise_in_titles_is_forgiven(tmp_path):
    folder = _write(tmp_path / "x", edit=_replace_line(3, lambda l: l.replace("'Blue Train'", "' Blue  Train'")))
    assert d3.read_d3(folder).splits["valid"][1].history_titles[1] == "Blue Train"


def test_non_utf8_byte_names_line(tmp_path):
    folder = _write(tmp_path / "x")
    raw = (folder / "valid.csv").read_bytes().split(b"\n")
    raw[2] = raw[2].replace(b"Blue Train", b"Blue \xff Train")
    (folder / "valid.csv").write_bytes(b"\n".join(raw))
    with pytest.raises(InputError, match=r"valid\.csv:3: byte 0xff"):
        d3.read_d3(folder)
    ds = d3.read_d3(folder, skip_invalid=True)
    assert ds.report.skipped == {"non_utf8": 1}
    assert [s.line for s in ds.splits["valid"]] == [2, 4]


def test_missing_column(tmp_path):
    folder = _write(tmp_path / "x", edit=lambda t: t.replace("history_item_title", "hist_titles", 1))
    for skip in (False, True):   # a missing column cannot be skipped
        with pytest.raises(InputError, match=r"valid\.csv:1 field 'history_item_title': missing column"):
            d3.read_d3(folder, skip_invalid=skip)


def test_bad_info_file(tmp_path):
    folder = _write(tmp_path / "x")
    (folder / "info.txt").write_text("Greatest Hits\t0\nBlue Train\tone\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"info\.txt:2 field 'id': not an integer"):
        d3.read_d3(folder)
    (folder / "info.txt").write_text("Greatest Hits\t0\nBlue Train\t0\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"info\.txt:2 field 'id': item id 0 appears twice"):
        d3.read_d3(folder)
    (folder / "info.txt").write_bytes(b"Greatest Hits\t0\nBlue \xc3 Train\t1\n")
    with pytest.raises(InputError, match=r"info\.txt:2: byte 0xc3"):
        d3.read_d3(folder)
    (folder / "info.txt").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"info\.txt:1 field 'title'"):
        d3.read_d3(folder)


def test_missing_files(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        d3.read_d3(tmp_path / "nope")
    folder = _write(tmp_path / "x")
    (folder / "test.csv").unlink()
    with pytest.raises(InputError, match=r"test\.csv: missing split file"):
        d3.read_d3(folder)
    (folder / "info.txt").unlink()
    with pytest.raises(InputError, match="no item info file"):
        d3.read_d3(folder)


def test_parse_list_never_evaluates():
    for text in ["[1, 2", "(1, 2)", "[[1]]", "[True]", "[1+1]", "[f(1)]", "{1}", "1"]:
        with pytest.raises(d3._RowError):
            d3.parse_list(text, int, "f", 1, "x")
    assert d3.parse_list("['a, b', \"it's\"]", str, "f", 1, "x") == ["a, b", "it's"]
    assert d3.parse_list(" [-1, 2] ", int, "f", 1, "x") == [-1, 2]


def test_write_read_round_trip(tmp_path):
    ds = d3.read_d3(_write(tmp_path / "a"))
    d3.write_d3(tmp_path / "b", ds.catalog, ds.splits)
    back = d3.read_d3(tmp_path / "b")
    assert back.catalog.titles == ds.catalog.titles
    for split in d3.SPLITS:
        assert back.splits[split] == ds.splits[split]


def test_inspect_cli(tmp_path, capsys):
    folder = _write(tmp_path / "CDs_and_Vinyl")
    assert data_main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "catalog: 5 items, 4 distinct titles" in out
    assert "musics" in out
    # split rows users targets mean-history
    assert any(l.split() == ["test", "3", "2", "3", "2.00"] for l in out.splitlines()), out


def test_inspect_cli_bad_input_exits_2(tmp_path, capsys):
    from latentr3_jax.cli import main as top
    folder = _write(tmp_path / "x", edit=BAD_CASES["unknown_history_id"][0])
    assert top(["data", "inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "valid.csv:3 field 'history_item_id'" in err
    assert top(["data", "inspect", str(folder), "--skip-invalid"]) == 0
    assert "unknown_id 1" in capsys.readouterr().out


REAL = {  # folder: (items, distinct titles, train, valid, test)
    "CDs_and_Vinyl": (5841, 5377, 10696, 6156, 6157),
    "Industrial_and_Scientific": (3686, None, 10393, 4532, 4533),
    "Office_Products": (3459, None, 9484, 4866, 4866),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_datasets(name):
    folder = amazon_dir(name)
    ds = d3.read_d3(folder)
    items, distinct, *rows = REAL[name]
    sizes = {s: len(v) for s, v in ds.splits.items()}
    print(f"{name}: {len(ds.catalog)} items, {len(ds.catalog.title_to_ids)} distinct titles, {sizes}")
    assert len(ds.catalog) == items
    if distinct is not None:
        assert len(ds.catalog.title_to_ids) == distinct
    assert [sizes[s] for s in d3.SPLITS] == rows
    assert ds.report.total_skipped == 0
    assert all(1 <= len(s.history_ids) <= 10 for v in ds.splits.values() for s in v)
    if name == "CDs_and_Vinyl":
        assert len(ds.catalog.title_to_ids["Greatest Hits"]) == 54


def test_write_read_round_trip_arbitrary_titles(tmp_path_factory):
    """Titles with quotes, commas, brackets, backslashes and non-ASCII survive write + read."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    title = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
                    max_size=30).filter(lambda t: t.strip() == t and t)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(title, min_size=2, max_size=6))
    def check(titles):
        folder = tmp_path_factory.mktemp("rt")
        cat = d3.Catalog({i: t for i, t in enumerate(titles)})
        rows = [d3.Sample("u", tuple(range(k)), tuple(titles[:k]), k, titles[k], line=k + 1)
                for k in range(1, len(titles))]
        d3.write_d3(folder, cat, {s: rows for s in d3.SPLITS})
        back = d3.read_d3(folder)
        assert back.catalog.titles == cat.titles
        assert back.splits["test"] == rows

    check()
