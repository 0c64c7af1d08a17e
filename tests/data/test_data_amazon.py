"""Raw Amazon 2018 preprocessing on small generated files, against a naive re-implementation."""

import calendar
import datetime
import gzip
import json
import random
from collections import defaultdict

import pytest

from latentr3_jax.data import amazon, d3
from latentr3_jax.cli import cmd_data as data_main
from latentr3_jax.errors import InputError


def ts(y, m, d=1):
    return calendar.timegm(datetime.datetime(y, m, d).timetuple())


def _raw(tmp_path):
    """Reviews and metadata with every filter exercised.

    - R0..R7: 8 items bought by users U0..U11 in 2018 (inside the first window);
    - O0..O5: 6 items bought by users V0..V7 in March 2017 (only inside a window grown
      back to 2017-01);
    - bad titles (none, <span id, 21 words): their reviews vanish;
    - C0 is reviewed by 5 users W0..W4 who each have only 4 other reviews on R items,
      and W0 also reviews nothing else: cascade item C0 -> W's -> gone;
    - U0 reviews 14 items (history truncated to 10).
    """
    meta = []
    for k in range(8):
        meta.append({"asin": f"R{k}", "title": f"Record {k}"})
    meta[3]["title"] = "Say &quot;Hi&quot; &amp; Bye"
    for k in range(6):
        meta.append({"asin": f"O{k}", "title": f"Oldie {k}"})
    meta.append({"asin": "C0", "title": "Cascade"})
    meta.append({"asin": "N0"})                                          # no title
    meta.append({"asin": "S0", "title": '<span id="x">junk</span>'})
    meta.append({"asin": "L0", "title": " ".join(["word"] * 21)})
    meta.append({"asin": "R0", "title": "duplicate meta row ignored"})
    reviews = []
    for u in range(12):
        for k in range(8):
            reviews.append({"reviewerID": f"U{u}", "asin": f"R{k}", "overall": 4.0,
                            "unixReviewTime": ts(2018, 1 + (k + u) % 10, 1 + u)})
        for bad in ("N0", "S0", "L0"):
            reviews.append({"reviewerID": f"U{u}", "asin": bad, "overall": 1.0,
                            "unixReviewTime": ts(2018, 2, 3)})
    for k in range(6):                                                   # U0 also buys the oldies
        reviews.append({"reviewerID": "U0", "asin": f"O{k}", "overall": 3.0,
                        "unixReviewTime": ts(2018, 10, 2 + k)})
    for v in range(8):
        for k in range(6):
            reviews.append({"reviewerID": f"V{v}", "asin": f"O{k}", "overall": 5.0,
                            "unixReviewTime": ts(2017, 3, 1 + v + k)})
    for w in range(5):
        reviews.append({"reviewerID": f"W{w}", "asin": "C0", "overall": 2.0,
                        "unixReviewTime": ts(2018, 5, 5)})
        for k in range(3):
            reviews.append({"reviewerID": f"W{w}", "asin": f"R{k}", "overall": 2.0,
                            "unixReviewTime": ts(2018, 6, 1 + k)})
    reviews.append({"reviewerID": "U1", "asin": "R0", "overall": 5.0,     # outside every window
                    "unixReviewTime": ts(2019, 1, 1)})
    rp = tmp_path / "CDs_5.json.gz"
    with gzip.open(rp, "wt", encoding="utf-8") as f:
        for r in reviews:
            f.write(json.dumps(r) + "\n")
    mp = tmp_path / "meta_CDs.json"
    mp.write_text("".join(json.dumps(m) + "\n" for m in meta), encoding="utf-8")
    return rp, mp, reviews, meta


def _naive(reviews, meta, min_items):
    """Straightforward reference of SPEC.md section 2."""
    titles = {}
    for m in meta:
        t = m.get("title")
        if m["asin"] in titles or not t or "<span id" in t or len(t.split()) > 20:
            continue
        titles[m["asin"]] = t.replace("&quot;", '"').replace("&amp;", "&")
    end = ts(2018, 11)
    y, mo = 2017, 10
    while True:
        start = ts(y, mo)
        kept = [r for r in reviews if r["asin"] in titles and start <= r["unixReviewTime"] <= end]
        while True:
            uc, ic = defaultdict(int), defaultdict(int)
            for r in kept:
                uc[r["reviewerID"]] += 1
                ic[r["asin"]] += 1
            new = [r for r in kept if uc[r["reviewerID"]] >= 5 and ic[r["asin"]] >= 5]
            if len(new) == len(kept):
                break
            kept = new
        if len({r["asin"] for r in kept}) >= min_items:
            break
        mo -= 3
        if mo < 1:
            y, mo = y - 1, mo + 12
    asins = sorted({r["asin"] for r in kept})
    random.Random(42).shuffle(asins)
    ids = {a: i for i, a in enumerate(asins)}
    seqs = defaultdict(list)
    for r in kept:
        seqs[r["reviewerID"]].append(r)
    samples = []
    for u, seq in seqs.items():
        seq.sort(key=lambda r: r["unixReviewTime"])
        for i in range(1, len(seq)):
            samples.append((seq[i]["unixReviewTime"], u, [ids[r["asin"]] for r in seq[max(0, i - 10):i]],
                            ids[seq[i]["asin"]]))
    return titles, ids, samples, (y, mo)


def test_prepare_matches_reference(tmp_path):
    rp, mp, reviews, meta = _raw(tmp_path)
    out = tmp_path / "out"
    summary = amazon.prepare_amazon(rp, mp, out, min_items=12, verbose=False)
    titles, ids, samples, (y, mo) = _naive(reviews, meta, 12)
    assert (y, mo) == (2017, 1)                      # grown back three times
    assert summary["window"] == "2017-01 .. 2018-11"
    assert set(ids) == {f"R{k}" for k in range(8)} | {f"O{k}" for k in range(6)}   # C0 cascaded out
    ds = d3.read_d3(out)
    assert ds.catalog.titles == {i: titles[a] for a, i in ids.items()}
    assert ds.catalog.titles[ids["R3"]] == 'Say "Hi" & Bye'
    n = len(samples)
    assert summary["items"] == 14 and summary["users"] == 20
    got = [s for split in d3.SPLITS for s in ds.splits[split]]
    assert [len(ds.splits[s]) for s in d3.SPLITS] == [int(0.8 * n), int(0.9 * n) - int(0.8 * n), n - int(0.9 * n)]
    # same multiset of samples, sorted by target time
    assert sorted((s.timestamp, s.user_id, list(s.history_ids), s.target_id) for s in got) == sorted(samples)
    times = [s.timestamp for s in got]
    assert times == sorted(times)
    assert max(len(s.history_ids) for s in got) == 10            # U0 has 14 purchases
    assert all(s.history_timestamps == tuple(sorted(s.history_timestamps)) for s in got)


def test_no_growth_when_enough_items(tmp_path):
    rp, mp, reviews, meta = _raw(tmp_path)
    summary = amazon.prepare_amazon(rp, mp, tmp_path / "o", min_items=8, verbose=False)
    assert summary["window"] == "2017-10 .. 2018-11" and summary["items"] == 8


def test_cli_with_category_and_progress(tmp_path, capsys):
    rp, mp, _, _ = _raw(tmp_path)
    out = tmp_path / "CDsOut"
    assert data_main(["prepare-amazon", "--reviews", str(rp), "--meta", str(mp), "--out", str(out),
                      "--category", "CDs_and_Vinyl", "--min-items", "12"]) == 0
    cap = capsys.readouterr()
    assert "[prepare-amazon] window 2017-10 .. 2018-11" in cap.err and "items=14" in cap.out
    ds = d3.read_d3(out)
    assert ds.name == "CDs_and_Vinyl" and ds.category_word == "musics"
    assert not list(out.glob(".*"))                      # no temporary files left


def test_bad_raw_input(tmp_path):
    rp, mp, _, _ = _raw(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"reviewerID": "a", "asin": "R0", "unixReviewTime": 1}\n{not json\n')
    with pytest.raises(InputError, match=r"bad\.json:2: not a JSON object"):
        amazon.prepare_amazon(bad, mp, tmp_path / "o", verbose=False)
    bad.write_text('{"reviewerID": "a", "asin": "R0"}\n')
    with pytest.raises(InputError, match=r"bad\.json:1 field 'unixReviewTime': missing"):
        amazon.prepare_amazon(bad, mp, tmp_path / "o", verbose=False)
    with pytest.raises(InputError, match="file not found"):
        amazon.prepare_amazon(tmp_path / "nope.json.gz", mp, tmp_path / "o", verbose=False)
    trunc = tmp_path / "trunc.json.gz"
    trunc.write_bytes(rp.read_bytes()[:-20])
    with pytest.raises(InputError, match=r"trunc\.json\.gz:\d+: cannot read"):
        amazon.prepare_amazon(trunc, mp, tmp_path / "o", verbose=False)
    bad.write_bytes(b'{"asin": "R0", "title": "ok"}\n{"asin": "R1", "title": "\xff"}\n')
    with pytest.raises(InputError, match=r"bad\.json:2: not valid UTF-8"):
        amazon.prepare_amazon(rp, bad, tmp_path / "o", verbose=False)


def test_title_filters():
    assert amazon.clean_title("A &quot;B&quot; &amp; C") == 'A "B" & C'
    assert amazon.clean_title("") is None and amazon.clean_title(None) is None
    assert amazon.clean_title('<span id="a">') is None
    assert amazon.clean_title(" ".join(["w"] * 20)) is not None
    assert amazon.clean_title(" ".join(["w"] * 21)) is None
    assert amazon.clean_title("tab\there") == "tab here"
