"""`latentr3 run` end to end on a tiny configuration: three variants, baselines, table, plot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.data.synthetic.num_items=64", "--config.data.synthetic.num_users=120",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.tokenizer.vocab_size=400",
    "--config.sft.batch_size=8", "--config.sft.max_steps=3", "--config.sft.epochs=1",
    "--config.sft.log_every=1", "--config.sft.warmup_steps=1",
    "--config.grpo.prompts_per_batch=2", "--config.grpo.max_steps=2", "--config.grpo.group_size=4",
    "--config.grpo.warmup_steps=1", "--config.grpo.log_every=1",
    "--config.eval.max_users=8", "--config.eval.batch_size=8", "--config.eval.num_beams=3",
    "--config.eval.progress=False",
]


@pytest.mark.slow
def test_run_pipeline_writes_table_and_plot(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "latentr3_jax", "run", "--config", os.path.join(ROOT, "configs/demo.py"),
           f"--config.workdir={workdir}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((workdir / "results.json").read_text())
    names = [r["name"] for r in rows]
    assert names[:3] == ["sft_baseline", "sft_latentr3", "lr_grpo"]
    assert len(names) > 3  # model-free baselines on the same rows
    for r in rows[:3]:
        assert 0.0 <= r["HR@10"] <= 1.0 and r["HR@5"] <= r["HR@10"]
        assert r["users"] == 8 and r["train_time_s"] > 0 and r["ms_per_user"] > 0
    assert rows[0]["num_thoughts"] == 0 and rows[1]["num_thoughts"] == 1
    # the demo's shared N=0 base stage ran first and both SFT variants started from it
    base = workdir / "base"
    assert json.loads((base / "model_config.json").read_text())["num_thoughts"] == 0
    assert (base / "train_summary.json").exists() and rows[0]["base_time_s"] > 0
    for name in ("sft_baseline", "sft_latentr3"):
        run_cfg = json.loads((workdir / name / "config.json").read_text())
        assert run_cfg["sft"]["init_from"] == str(base)
        assert (json.loads((workdir / name / "model_config.json").read_text())["decoder"]
                == json.loads((base / "model_config.json").read_text())["decoder"])
    md = (workdir / "results.md").read_text()
    assert "SFT + LatentR³ + LR-GRPO" in md and "HR@5" in md
    png = (workdir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "HR@5" in proc.stdout

    # A second run finds every stage done and rebuilds the same table.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained" in again.stdout
    rows2 = json.loads((workdir / "results.json").read_text())
    assert [r["HR@10"] for r in rows2] == [r["HR@10"] for r in rows]


def test_a_copied_evaluation_is_reused_only_for_the_same_weights(tmp_path):
    """pipeline.seed_evaluation: evaluate_run resumes from another run's predictions when
    the weights are the same (nothing decoded, same rows) and decodes everything when they
    differ (as after an LR-GRPO run that moved)."""
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, os.path.join(ROOT, "tests", "train"))
    from test_grpo_train import _grpo_cfg, _make_sft_run
    from latentr3_jax import pipeline
    from latentr3_jax.eval.evaluate import evaluate_run
    from latentr3_jax.train import runs

    sft = tmp_path / "sft"
    _make_sft_run(sft, _grpo_cfg(sft, sft))
    cfg = _grpo_cfg(tmp_path / "e", sft)
    cfg.eval.max_users, cfg.eval.batch_size, cfg.eval.num_beams = 8, 8, 3
    cfg.eval.progress = False
    first = evaluate_run(cfg, str(sft), split="train", out_dir=str(tmp_path / "a"),
                         print_table=False)
    assert first["evaluated_now"] == 8
    assert pipeline.seed_evaluation(str(tmp_path / "a"), str(tmp_path / "b"))
    assert not pipeline.seed_evaluation(str(tmp_path / "a"), str(tmp_path / "b"))  # has some
    same = evaluate_run(cfg, str(sft), split="train", out_dir=str(tmp_path / "b"),
                        print_table=False)
    assert same["evaluated_now"] == 0 and same["complete"]
    assert (tmp_path / "b" / "predictions.jsonl").read_text() == \
        (tmp_path / "a" / "predictions.jsonl").read_text()
    # other weights: the copied predictions are dropped and every row decoded again
    run = runs.load_run(str(sft))
    moved = jax.tree.map(lambda x: x, run.params)
    moved["latent"] = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), moved["latent"])
    assert pipeline.seed_evaluation(str(tmp_path / "a"), str(tmp_path / "c"))
    other = evaluate_run(cfg, split="train", out_dir=str(tmp_path / "c"), print_table=False,
                         model_config=run.model_config, params=moved, tokenizer=run.tokenizer,
                         num_thoughts=run.num_thoughts, latent_mode=run.latent_mode)
    assert other["evaluated_now"] == 8 and other["complete"]
