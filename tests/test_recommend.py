"""Using a trained run: the Recommender API against `latentr3 evaluate`, input errors and
truncation, the HF export round trip, and `latentr3 recommend` on typed and JSONL input."""

import json
import os

import numpy as np
import pytest

from latentr3_jax import cli
from latentr3_jax import data as D
from latentr3_jax.config import default_config_file, parse_config
from latentr3_jax.errors import InputError
from latentr3_jax.eval import evaluate as E
from latentr3_jax.eval import metrics as M
from latentr3_jax.recommend import Recommender
from latentr3_jax.train import runs
from latentr3_jax.train.sft import train_sft

FLAGS = ["--config.data.cutoff=256", "--config.data.buckets=(128,256)",
         "--config.eval.num_beams=4", "--config.eval.batch_size=4",
         "--config.eval.progress=False", "--config.eval.max_users=10", "--config.eval.ks=(1,4)"]


def _cfg(workdir, *extra):
    return parse_config(["--config", default_config_file("sft_tiny.py"),
                         f"--config.workdir={workdir}", *FLAGS, *extra])[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LatentR³ run (N = 1) trained for a few steps on the tiny synthetic set."""
    d = tmp_path_factory.mktemp("rec") / "run"
    cfg = _cfg(d, "--config.sft.max_steps=4")
    train_sft(cfg, progress=False)
    return str(d), cfg


@pytest.fixture(scope="module")
def dataset(run):
    return D.load_dataset(runs.load_run(run[0]).config)


def _evaluate(run_dir, cfg, out_dir, mode="constrained"):
    E.evaluate_run(cfg, run_dir, split="test", mode=mode, out_dir=str(out_dir), print_table=False)
    return sorted(M.read_predictions(os.path.join(out_dir, E.PREDICTIONS)), key=lambda r: r["row"])


def _histories(dataset, n=10):
    return [list(s.history_titles) for s in dataset.splits["test"][:n]]


@pytest.mark.parametrize("mode", ["constrained", "bigrec"])
def test_rankings_equal_evaluate(run, dataset, tmp_path, mode):
    run_dir, cfg = run
    rows = _evaluate(run_dir, cfg, tmp_path / "eval", mode)
    rec = Recommender.from_run(run_dir, config=cfg, mode=mode)
    got = rec.recommend_with_info(_histories(dataset), k=4)
    assert len(got) == len(rows) == 10
    for row, r in zip(rows, got):
        assert [x.item_id for x in r.items] == row["ranked_ids"][:4]
        if mode == "constrained":   # one score per title; a title's items share it
            by_title = dict(zip(row["ranked_titles"], row["scores"]))
            assert [x.score for x in r.items] == [by_title[x.title] for x in r.items]
        else:
            assert [x.score for x in r.items] == row["scores"][:4]
            assert r.generated == row["generated"]
        assert all(x.title == dataset.catalog.titles[x.item_id] for x in r.items)


def test_scores_are_ranked_and_k_cuts(run, dataset):
    rec = Recommender.from_run(run[0], config=run[1])
    (full,), (two,) = rec.recommend(_histories(dataset, 1), k=4), rec.recommend(_histories(dataset, 1), k=2)
    assert two == full[:2]
    scores = [x.score for x in full]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


def test_titles_outside_the_catalog_are_text(run, dataset):
    rec = Recommender.from_run(run[0], config=run[1])
    (got,) = rec.recommend([["A Title Nobody Has", "Another Unknown One"]], k=3)
    assert len(got) == 3 and all(x.item_id in dataset.catalog for x in got)


def test_input_errors(run):
    rec = Recommender.from_run(run[0], config=run[1])
    with pytest.raises(InputError, match="history 1 is empty"):
        rec.recommend([["a"], []])
    with pytest.raises(InputError, match="history 0: expected a list of item titles"):
        rec.recommend(["just a string"])
    with pytest.raises(InputError, match="history 0, item 1: expected a non-empty title"):
        rec.recommend([["a", 3]])
    with pytest.raises(InputError, match=r"k must be an integer in 1\.\.4 \(eval.num_beams\)"):
        rec.recommend([["a"]], k=5)
    with pytest.raises(InputError, match="k must be"):
        rec.recommend([["a"]], k=0)
    with pytest.raises(InputError, match="histories must be a list"):
        rec.recommend("a")


def test_long_history_keeps_its_last_tokens(run, dataset):
    rec = Recommender.from_run(run[0], config=run[1])
    titles = [dataset.catalog.titles[i] for i in dataset.catalog.ids]
    short, long = titles[:1], (titles * 4)[:150]
    enc, cut = rec.encode([short, long])
    assert cut == [False, True]
    assert len(enc[1].prompt_ids) == 256 and len(enc[0].prompt_ids) < 256
    full = rec.tokenizer.encode(D.build_prompt(long, rec.category_word, rec.template))
    assert enc[1].prompt_ids == full[-256:]
    got = rec.recommend_with_info([short, long], k=2)
    assert [g.truncated for g in got] == [False, True] and all(len(g.items) == 2 for g in got)


def test_lazy_top_level_import():
    import latentr3_jax
    assert latentr3_jax.Recommender is Recommender


# --------------------------------------------------------------------------- HF export


def test_hf_export_round_trip(run, dataset, tmp_path):
    run_dir, cfg = run
    out = tmp_path / "export"
    assert cli.main(["convert", "--to-hf", "--from", run_dir, "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "latent.safetensors", "tokenizer.json",
            runs.EXPORT, runs.EXPORT_CATALOG} <= names
    facts = json.loads((out / runs.EXPORT).read_text())
    assert facts["num_thoughts"] == 1 and facts["latent_mode"] == "ratt"

    # the export recommends alone (its catalog.json) with the same rankings as the run
    hist = _histories(dataset)
    a = Recommender.from_run(run_dir, config=cfg).recommend(hist, k=4)
    b = Recommender.from_run(str(out), config=cfg).recommend(hist, k=4)
    assert a == b
    # evaluation reads it as it reads the run
    assert _evaluate(str(out), cfg, tmp_path / "ev_export") == \
        [dict(r, **{}) for r in _evaluate(run_dir, cfg, tmp_path / "ev_run")]
    # and a new SFT run can start from it, LatentRATT included
    from latentr3_jax.train import setup
    import jax
    cfg2 = _cfg(tmp_path / "next", f"--config.sft.init_from={out}")
    config, params = setup.build_model(cfg2, runs.load_run(str(out)).tokenizer,
                                       jax.random.PRNGKey(0))
    src = runs.load_run(run_dir).params
    np.testing.assert_array_equal(np.asarray(params["latent"]["q"]["kernel"]),
                                  np.asarray(src["latent"]["q"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]),
                                  np.asarray(src["embed"]["embedding"]))


def test_export_errors_name_the_file(run, tmp_path):
    out = tmp_path / "export"
    assert cli.main(["convert", "--to-hf", "--from", run[0], "--out", str(out)]) == 0
    (out / runs.EXPORT).write_text(json.dumps({"format": 1, "num_thoughts": "one"}))
    with pytest.raises(InputError, match=r"latentr3\.json: field 'num_thoughts'"):
        runs.load_run(str(out))
    os.remove(out / "latent.safetensors")
    (out / runs.EXPORT).write_text(json.dumps(
        {"format": 1, "num_thoughts": 1, "latent_mode": "ratt", "thought_id": 5, "config": {}}))
    with pytest.raises(InputError, match="latent.safetensors is missing"):
        runs.load_run(str(out))


# --------------------------------------------------------------------------- latentr3 recommend


def _cli(run_dir, *args):
    return cli.main(["recommend", "--run", run_dir, *args, "--config",
                     default_config_file("sft_tiny.py"), *FLAGS])


def test_cli_history(run, dataset, capsys):
    hist = _histories(dataset, 1)[0]
    assert _cli(run[0], *sum((["--history", t] for t in hist), []), "--k", "3", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    want = Recommender.from_run(run[0], config=run[1]).recommend([hist], k=3)[0]
    assert [r["item_id"] for r in got["recommendations"]] == [x.item_id for x in want]
    assert _cli(run[0], "--history", hist[0], "--k", "2") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"


def test_cli_file_resumes_and_checks_input(run, dataset, tmp_path, capsys):
    hist = _histories(dataset, 9)
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"history": h, "id": f"u{n}"}) if n % 2 else json.dumps(h)
             for n, h in enumerate(hist)]
    lines.insert(3, "")
    lines[5] = json.dumps({"history": hist[4], "k": 2, "id": "short"})
    src.write_text("\n".join(lines) + "\n")
    fresh = tmp_path / "fresh.jsonl"
    assert _cli(run[0], "--input", str(src), "--output", str(fresh), "--k", "4") == 0
    want = [json.loads(x) for x in fresh.read_text().splitlines()]
    assert [w["line"] for w in want] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert want[1]["id"] == "u1" and "id" not in want[0]
    assert len(want[4]["recommendations"]) == 2 and len(want[0]["recommendations"]) == 4

    # interrupted: two records and half of a third on disk -> the rerun completes it
    cut = tmp_path / "cut.jsonl"
    text = fresh.read_text()
    first = text.splitlines(keepends=True)
    cut.write_text("".join(first[:2]) + first[2][:10])
    (tmp_path / "cut.jsonl.meta.json").write_text((tmp_path / "fresh.jsonl.meta.json").read_text()
                                                 .replace("fresh.jsonl", "cut.jsonl"))
    capsys.readouterr()
    assert _cli(run[0], "--input", str(src), "--output", str(cut), "--k", "4") == 0
    assert "7 histories now, 9 in all" in capsys.readouterr().out
    assert sorted((json.loads(x) for x in cut.read_text().splitlines()),
                  key=lambda r: r["line"]) == want

    # other settings are refused, --overwrite starts over
    assert _cli(run[0], "--input", str(src), "--output", str(cut), "--k", "3") == 2
    assert "k 4 -> 3" in capsys.readouterr().err
    assert _cli(run[0], "--input", str(src), "--output", str(cut), "--k", "3", "--overwrite") == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(hist[0]) + "\n" + json.dumps({"history": []}) + "\n")
    assert _cli(run[0], "--input", str(bad), "--output", str(tmp_path / "o.jsonl")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2: field 'history': history is empty" in err
    bad.write_text(json.dumps({"history": ["a"], "user": 1}) + "\n")
    assert _cli(run[0], "--input", str(bad), "--output", str(tmp_path / "o.jsonl")) == 2
    assert "line 1: unknown field(s) 'user'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_needs_one_input(run, capsys):
    assert _cli(run[0]) == 2
    assert "pass --history TITLE" in capsys.readouterr().err
    assert cli.main(["recommend", "--run", "/nonexistent/run", "--history", "a"]) == 2
    assert "/nonexistent/run: run directory not found" in capsys.readouterr().err
