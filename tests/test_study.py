"""`latentr3 study`: its statistics against their formulas, and a tiny two-seed study."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from latentr3_jax import study
from latentr3_jax.eval import metrics as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_per_user_metrics_average_to_the_metric_code():
    ranks = np.array([0, 3, -1, 9, 4, 12, 1])
    users = study.per_user(ranks)
    want = M.rank_metrics(ranks.tolist(), ks=(5, 10))
    for name in study.METRICS:
        assert users[name].mean() == pytest.approx(want[name], abs=1e-12)
    assert users["NDCG@5"][1] == pytest.approx(1 / math.log2(5))


def test_seed_interval_is_the_t_interval():
    v = [0.10, 0.13, 0.16]
    iv = study.seed_interval(v)
    half = 4.303 * np.std(v, ddof=1) / math.sqrt(3)
    assert iv["mean"] == pytest.approx(0.13) and iv["hi"] - iv["mean"] == pytest.approx(half)
    assert study.seed_interval([0.2])["lo"] is None
    assert study.t975(100) == 1.96 and study.t975(11) == study.t975(10)


def test_paired_difference_interval_and_p_value():
    rng = np.random.default_rng(0)
    b = rng.random((3, 400))
    # a constant gain: a degenerate interval at the gain and the smallest p-value
    out = study.paired_difference(b + 0.05, b, resamples=500)
    assert out["diff"] == pytest.approx(0.05) and out["lo"] == pytest.approx(0.05)
    assert out["p"] == pytest.approx(1 / 501)
    # noise only: the interval covers 0 and p is large
    a = b + rng.normal(0.0, 0.2, b.shape)
    out = study.paired_difference(a, b, resamples=1000)
    assert out["lo"] < 0 < out["hi"] and out["p"] > 0.05
    # the interval is about mean +- 1.96 sd / sqrt(n) of the per-user differences
    d = (a - b).mean(0)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert (out["hi"] - out["lo"]) / 2 == pytest.approx(1.96 * se, rel=0.15)
    # a real gain against noise is detected
    out = study.paired_difference(b + 0.05 + rng.normal(0, 0.2, b.shape), b, resamples=1000)
    assert out["lo"] > 0 and out["p"] < 0.01


TINY = [
    "--config.data.synthetic.num_items=64", "--config.data.synthetic.num_users=120",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.tokenizer.vocab_size=400", "--config.pipeline.base_epochs=0",
    "--config.sft.batch_size=8", "--config.sft.max_steps=3", "--config.sft.epochs=1",
    "--config.sft.log_every=1", "--config.sft.warmup_steps=1",
    "--config.grpo.prompts_per_batch=2", "--config.grpo.max_steps=2", "--config.grpo.group_size=4",
    "--config.grpo.warmup_steps=1", "--config.grpo.log_every=1",
    "--config.eval.max_users=8", "--config.eval.batch_size=8", "--config.eval.num_beams=3",
    "--config.eval.progress=False", "--config.study.seeds=0,1", "--config.study.bootstrap=200",
]


@pytest.mark.slow
def test_study_two_seeds_end_to_end(tmp_path):
    workdir = tmp_path / "study"
    cmd = [sys.executable, "-m", "latentr3_jax", "study", "--config",
           os.path.join(ROOT, "configs/demo.py"), f"--config.workdir={workdir}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((workdir / "study.json").read_text())
    names = [r["name"] for r in res["table"]]
    assert names[:3] == ["sft_baseline", "sft_latentr3", "lr_grpo"]
    assert {"most_popular", "last_item", "cooccurrence", "sasrec"} <= set(names)
    assert res["seeds"] == [0, 1] and res["users"] == 8
    # each variant's mean over seeds is the mean of its two runs' own metrics
    for i, name in enumerate(names[:3]):
        per_seed = [json.loads((workdir / f"seed_{s}" / name / "eval_test_constrained" /
                                "metrics.json").read_text()) for s in (0, 1)]
        for m in study.METRICS:
            assert res["table"][i][f"{m}_title"]["mean"] == pytest.approx(
                np.mean([r[m] for r in per_seed]), abs=1e-9)
            assert res["table"][i][f"{m}_id"]["mean"] == pytest.approx(
                np.mean([r[f"{m}_id"] for r in per_seed]), abs=1e-9)
    pairs = {(p["pair"], p["rule"], p["metric"]) for p in res["pairs"]}
    assert ("LatentR³ − N=0", "title", "NDCG@10") in pairs and ("LR-GRPO − SFT", "id", "HR@5") in pairs
    for p in res["pairs"]:
        assert p["lo"] <= p["diff"] <= p["hi"] and 0 < p["p"] <= 1
    md = (workdir / "study.md").read_text()
    assert "paired differences" in md and "SASRec" in md
    assert (workdir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerunning finds every stage done and gives the same study
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already trained") == 6
    res2 = json.loads((workdir / "study.json").read_text())
    assert res2["table"] == res["table"] and res2["pairs"] == res["pairs"]
    # report_only: the runs without their checkpoints (as copied back from an accelerator)
    # give the same study from their predictions alone, and decode nothing
    import shutil
    for s in (0, 1):
        for name in names[:3]:
            run = workdir / f"seed_{s}" / name
            for entry in run.iterdir():
                if entry.name != "eval_test_constrained":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (workdir / "study.json").unlink()
    report = subprocess.run(cmd + ["--config.study.report_only=True"], capture_output=True,
                            text=True, timeout=1200, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "training" not in report.stdout and "evaluating" not in report.stdout
    res3 = json.loads((workdir / "study.json").read_text())
    assert res3["table"] == res["table"] and res3["pairs"] == res["pairs"]
    # one seed's predictions missing: exit 2, one line naming the file
    missing = workdir / "seed_1" / "lr_grpo" / "eval_test_constrained" / "predictions.jsonl"
    missing.unlink()
    bad = subprocess.run(cmd + ["--config.study.report_only=True"], capture_output=True,
                         text=True, timeout=1200, cwd=ROOT)
    assert bad.returncode == 2 and str(missing) in bad.stderr.strip().splitlines()[-1]


def test_pool_seeds_reproduces_a_committed_study():
    """bench/pool_seeds.py on one results folder gives the study.json that the study command
    wrote for it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import pool_seeds
    folder = os.path.join(ROOT, "results", "h200_industrial_smollm2-135m_seed0")
    got = pool_seeds.pool([folder], resamples=2000)
    want = json.loads(open(os.path.join(folder, "study.json"), encoding="utf-8").read())
    key = lambda p: (p["pair"], p["rule"], p["metric"])   # noqa: E731
    for p, q in zip(sorted(got["pairs"], key=key), sorted(want["pairs"], key=key)):
        assert key(p) == key(q)
        for k in ("diff", "lo", "hi", "p"):
            assert p[k] == pytest.approx(q[k], abs=1e-12)
    rows = {r["name"]: r for r in want["table"]}
    for name, row in got["table"].items():
        assert row["NDCG@10_title"]["mean"] == pytest.approx(rows[name]["NDCG@10_title"]["mean"])


def test_pool_seeds_two_folders(tmp_path):
    import gzip
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import pool_seeds
    rng = np.random.default_rng(0)
    ranks = []
    for s in range(2):
        r = {n: {rule: rng.integers(-1, 10, 300).tolist() for rule in ("title", "id")}
             for n in ("sft_baseline", "sft_latentr3", "lr_grpo")}
        ranks.append(r)
        d = tmp_path / f"seed{s}"
        d.mkdir()
        with gzip.open(d / "test_ranks.json.gz", "wt") as f:
            json.dump({"doc": "", "ranks": r}, f)
    got = pool_seeds.pool([str(tmp_path / "seed0"), str(tmp_path / "seed1")], resamples=500)
    pair = next(p for p in got["pairs"] if p["pair"] == "LatentR³ − N=0"
                and p["rule"] == "title" and p["metric"] == "NDCG@10")
    a = np.stack([study.per_user(np.array(r["sft_latentr3"]["title"]))["NDCG@10"] for r in ranks])
    b = np.stack([study.per_user(np.array(r["sft_baseline"]["title"]))["NDCG@10"] for r in ranks])
    assert pair["diff"] == pytest.approx((a - b).mean(0).mean())
    assert got["table"]["sft_latentr3"]["NDCG@10_title"]["lo"] is not None   # two seeds
