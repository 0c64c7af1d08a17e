"""bench/grpo_study.py's run plan and its SmolLM2 configuration."""

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import grpo_study as gs  # noqa: E402
from latentr3_jax import config as config_lib  # noqa: E402
from latentr3_jax import pipeline  # noqa: E402


def test_runs_spec_pairs_variants_with_their_own_learning_rates():
    got = gs.parse_runs("ppo_batch@5e-5, reinforce_rloo@1e-3", [5e-5, 1e-3], "")
    assert [(n, lr) for n, _, _, lr in got] == [("ppo_batch", 5e-5), ("reinforce_rloo", 1e-3)]
    assert got[1][2] == {"estimator": "reinforce", "advantage": "rloo"}
    # no spec: every wanted variant at every rate, rates outermost, variants in table order
    got = gs.parse_runs("", [5e-5, 1e-3], "pathwise,ppo_batch")
    assert [(n, lr) for n, _, _, lr in got] == [("ppo_batch", 5e-5), ("pathwise", 5e-5),
                                                ("ppo_batch", 1e-3), ("pathwise", 1e-3)]
    for bad in ("ppo_batch", "nope@1e-3", "pathwise@fast"):
        with pytest.raises(SystemExit, match="--runs"):
            gs.parse_runs(bad, [5e-5], "")
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        gs.parse_runs("", [5e-5], "ppo_batch,nope")


def test_smollm2_grpo_config_is_the_slot_study_sft_config_plus_the_study_grpo(tmp_path):
    """--model smollm2: the SFT part equals bench/slot_study.py's (so its arms can be the
    start, --sft-from), the LR-GRPO part is this study's, each run keeps its final step."""
    args = gs.setup_defaults(dataset=os.path.join(str(tmp_path), "Industrial_and_Scientific"),
                             workdir=str(tmp_path), seed=0, train_rows=640, eval_rows=200,
                             sft_epochs=1, max_target_len=32, target_buckets="(16,32)",
                             prompts=8, batches=24, every=12, warmup=2)
    args.dtype, args.sft_batch = "bfloat16", 16
    sft_cfg, sft_over = gs.smollm2_cfg(args)
    cfg, over = gs.smollm2_cfg(args, grpo=True)
    assert over[:len(sft_over)] == sft_over
    assert cfg.model.to_dict() == sft_cfg.model.to_dict()
    assert cfg.data.to_dict() == sft_cfg.data.to_dict() and cfg.sft.to_dict() == sft_cfg.sft.to_dict()
    assert pipeline._base_config(cfg, str(tmp_path)) is None
    g = cfg.grpo
    assert (g.prompts_per_batch, g.group_size, g.max_steps, g.warmup_steps) == (8, 8, 24, 2)
    assert (g.checkpoint_every, g.diagnose_every, g.select) == (12, 12, "last")
    assert g.keep_checkpoints >= 24 // 12 + 1          # every checkpoint stays for the curve
    assert sft_cfg.grpo.select == config_lib.base_config().grpo.select
    name, _, over_, lr = gs.parse_runs("reinforce_rloo@1e-3", [], "")[0]
    vcfg = gs.grpo_cfg(gs.one_shape(cfg, args), str(tmp_path / "sft"), name, over_, lr)
    assert (vcfg.grpo.estimator, vcfg.grpo.advantage, vcfg.grpo.learning_rate) == \
        ("reinforce", "rloo", 1e-3)
    assert (tuple(vcfg.data.buckets), tuple(vcfg.data.target_buckets)) == ((256,), (32,))
    config_lib.validate(vcfg, stage="grpo")


@pytest.mark.parametrize("model", ["scratch", "smollm2"])
def test_ensemble_study_decodes_with_the_slot_study_config_of_each_seed(tmp_path, model):
    """bench/ensemble_study.py, given the slot study's options, builds each seed's config as
    slot_study trained it (so M = 1 is the slot study's own decode), and its defaults for
    the from-scratch runs are the ones it had before it took those options."""
    import ensemble_study as es
    import slot_study as ss
    data = os.path.join(str(tmp_path), "Industrial_and_Scientific")
    opts = ["--dataset", data, "--workdir", str(tmp_path / "w"), "--model", model,
            "--train-rows", "640", "--eval-rows", "200", "--max-target-len", "32",
            "--target-buckets", "(16,32)", "--dtype", "bfloat16"]
    e_args = es.build_parser().parse_args(opts + ["--samples", "4,8", "--sigmas", "0.5"])
    s_args = ss.build_parser().parse_args(opts + ["--arms", "n0,ratt"])
    for seed in (0, 1):
        e_cfg, _ = ss.seed_config(e_args, seed)
        s_cfg, _ = ss.seed_config(s_args, seed)
        assert e_cfg.to_dict() == s_cfg.to_dict()
        assert e_cfg.workdir == str(tmp_path / ("w" if seed == 0 else "w_seed1"))
        assert (e_cfg.data.max_eval_rows, e_cfg.data.max_target_len) == (200, 32)
        if model == "smollm2":
            assert e_cfg.model.dtype == "bfloat16" and e_cfg.model.hf_path.endswith(".gguf")
    if model == "scratch":
        old, _ = gs.base_cfg(gs.setup_defaults(dataset=data, workdir=str(tmp_path / "w"), seed=0,
                                               eval_rows=400, eval_batch=32))
        new, _ = ss.seed_config(es.build_parser().parse_args(
            ["--dataset", data, "--workdir", str(tmp_path / "w")]), 0)
        assert new.to_dict() == old.to_dict()
