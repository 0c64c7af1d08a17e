"""bench/slot_study.py's bookkeeping: arm configs, seed directories, pooled differences."""

import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import slot_study  # noqa: E402
from latentr3_jax import config as config_lib  # noqa: E402
from latentr3_jax import pipeline  # noqa: E402


def _cfg(tmp_path):
    cfg, _ = config_lib.parse_config([f"--config.workdir={tmp_path}",
                                      "--config.pipeline.base_epochs=1"])
    return cfg


def test_arm_configs_start_from_the_base_and_change_only_their_keys(tmp_path):
    cfg = _cfg(tmp_path)
    base = pipeline._base_config(cfg, str(tmp_path))
    got = {name: slot_study.arm_config(cfg, base, str(tmp_path), name, over)
           for name, _, over in slot_study.ARMS}
    for name, v in got.items():
        assert v.workdir == os.path.join(str(tmp_path), name)
        assert v.sft.init_from == base.workdir
    assert got["n0"].model.num_thoughts == 0
    assert got["ratt"].model.num_thoughts == 1 and got["ratt"].sft.latent_lr_scale == 1.0
    assert got["ratt"].model.latent_init == "normal" and got["ratt"].model.latent_mode == "ratt"
    assert got["ratt_lr10"].sft.latent_lr_scale == 10.0
    assert got["ratt_identity"].model.latent_init == "identity"
    assert got["hidden"].model.latent_mode == "hidden"
    assert got["ratt_n2"].model.num_thoughts == 2
    for k in (2, 3, 4):
        assert got[f"ratt_k{k}"].model.latent_factors == k
        assert got[f"ratt_k{k}"].model.num_thoughts == 1
    assert got["ratt"].model.latent_factors == 1
    assert set(slot_study.DEFAULT_ARMS) <= set(got)
    for v in got.values():
        config_lib.validate(v, stage="sft")


def test_seed_dirs_and_pooled_differences():
    assert slot_study.seed_workdir("/r/s", 0) == "/r/s"
    assert slot_study.seed_workdir("/r/s", 2) == "/r/s_seed2"
    a = [{"NDCG@10": np.array([1.0, 0.0, 0.5]), "HR@10": np.array([1.0, 0.0, 1.0])},
         {"NDCG@10": np.array([0.0, 0.0, 0.5]), "HR@10": np.array([1.0, 1.0, 1.0])}]
    b = [{"NDCG@10": np.zeros(3), "HR@10": np.zeros(3)}] * 2
    got = slot_study.pooled(a, b, resamples=200)
    # per user, averaged over seeds: (0.5, 0, 0.5) -> mean 1/3; HR (1, 0.5, 1) -> 5/6
    assert abs(got["NDCG@10"]["diff"] - 1 / 3) < 1e-12
    assert abs(got["HR@10"]["diff"] - 5 / 6) < 1e-12
    assert got["NDCG@10"]["users"] == 3
    per_seed = [{"x": {"v": 1.0}}, {"x": {"v": 3.0}}]
    assert slot_study.mean_over(per_seed, ("x", "v")) == 2.0
    assert slot_study.mean_over(per_seed + [{"x": {}}], ("x", "v")) is None


def test_choice_on_valid_names_ties_and_the_report_says_so():
    summary = {"ratt": {"valid_NDCG@10": 0.04}, "ratt_n2": {"valid_NDCG@10": 0.05},
               "hidden": {"valid_NDCG@10": 0.03}, "ratt_n4": {"valid_NDCG@10": 0.05}}
    assert slot_study.choose_on_valid(summary, ["ratt", "ratt_n2", "hidden", "ratt_n4"]) \
        == ("ratt_n2", ["ratt_n4"])
    assert slot_study.choose_on_valid(summary, ["ratt_n4", "ratt_n2"]) == ("ratt_n4", ["ratt_n2"])
    assert slot_study.choose_on_valid(summary, ["ratt", "hidden"]) == ("ratt", [])
    arm = {"label": "N = 0", "best_valid_loss": 2.9, "valid_NDCG@10": 0.03, "valid_HR@10": 0.05}
    res = {"title": "t", "command": "c", "valid_rows": 2, "test_rows": 2, "items": 9,
           "seeds": [0], "summary": {"n0": dict(arm, **{"test_NDCG@10": 0.1, "test_HR@10": 0.2})},
           "decoded_on_test": ["n0"], "chosen_on_valid": "ratt_n2", "tied_on_valid": ["ratt_n4"]}
    md = slot_study.markdown(res)
    assert "chosen on valid: ratt_n2, tied on valid NDCG@10 with ratt_n4" in md
    res["tied_on_valid"] = []
    assert "chosen on valid: ratt_n2)" in slot_study.markdown(res)


def test_smollm2_config_has_no_base_stage_and_the_study_subsample(tmp_path):
    """--model smollm2: configs/smollm2.py's cpu variant, this study's rows and lengths."""
    args = slot_study.gs.setup_defaults(
        dataset=os.path.join(str(tmp_path), "Industrial_and_Scientific"), workdir=str(tmp_path),
        seed=1, train_rows=640, eval_rows=200, sft_epochs=1, max_target_len=32,
        target_buckets="(16,32)")
    args.dtype, args.sft_batch = "bfloat16", 16
    cfg, _ = slot_study.smollm2_cfg(args)
    assert cfg.model.hf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert pipeline._base_config(cfg, str(tmp_path)) is None
    assert (cfg.seed, cfg.data.max_train_rows, cfg.data.max_eval_rows) == (1, 640, 200)
    assert (cfg.sft.epochs, cfg.sft.batch_size, cfg.model.dtype) == (1, 16, "bfloat16")
    assert cfg.eval.split == "valid"
    config_lib.validate(cfg, stage="sft")
    args.dataset = str(tmp_path / "Elsewhere")
    try:
        slot_study.smollm2_cfg(args)
    except SystemExit as e:
        assert "--dataset must be one of" in str(e)
    else:
        raise AssertionError("an unknown dataset folder must be refused")


def test_fresh_users_compares_the_study_rows_and_the_rest_apart():
    import fresh_users
    rows, skip = 10, 4
    zero = {"NDCG@10": np.zeros(rows), "HR@10": np.zeros(rows)}
    late = np.r_[np.zeros(skip), np.ones(rows - skip)]        # better on the fresh rows only
    early = np.r_[np.full(skip, 0.5), np.zeros(rows - skip)]  # better on the study rows only
    users = {"n0": [zero, zero],
             "ratt": [{"NDCG@10": late, "HR@10": early}, {"NDCG@10": late, "HR@10": early}]}
    got = fresh_users.compare_parts(users, skip, rows, resamples=200)
    assert set(got) == {"n0", "ratt"} and "vs_n0" not in got["n0"]["study_rows"]
    r = got["ratt"]
    assert r["study_rows"]["vs_n0"]["NDCG@10"]["diff"] == 0.0
    assert r["fresh_rows"]["vs_n0"]["NDCG@10"]["diff"] == 1.0
    assert r["fresh_rows"]["vs_n0"]["NDCG@10"]["users"] == rows - skip
    assert r["study_rows"]["vs_n0"]["HR@10"]["diff"] == 0.5
    assert r["fresh_rows"]["vs_n0"]["HR@10"]["diff"] == 0.0
    assert r["fresh_rows"]["mean"]["NDCG@10"] == 1.0 and r["study_rows"]["mean"]["HR@10"] == 0.5
    assert r["all_rows"]["vs_n0"]["NDCG@10"]["users"] == rows
    assert abs(r["all_rows"]["vs_n0"]["NDCG@10"]["diff"] - (rows - skip) / rows) < 1e-12
    assert abs(r["all_rows"]["vs_n0"]["HR@10"]["diff"] - 0.5 * skip / rows) < 1e-12


def test_recipe_bigrec_sets_the_template_and_grounding_for_both_models(tmp_path):
    """--recipe bigrec: the Alpaca template and BIGRec grounding, and decode folders named
    by the mode; d3 (the default) leaves the D3 template and the trie search."""
    gs = slot_study.gs
    for recipe, template, mode in (("d3", "latentr3", "constrained"), ("bigrec", "bigrec", "bigrec")):
        args = gs.setup_defaults(dataset=os.path.join(str(tmp_path), "Industrial_and_Scientific"),
                                 workdir=str(tmp_path), seed=0, recipe=recipe)
        cfg, _ = gs.base_cfg(args)
        assert (cfg.data.template, cfg.eval.mode) == (template, mode)
        args.dtype, args.sft_batch = "float32", 16
        cfg, _ = slot_study.smollm2_cfg(args)
        assert (cfg.data.template, cfg.eval.mode) == (template, mode)
    try:
        gs.recipe_overrides("bigrec_typo")
    except ValueError as e:
        assert "bigrec_typo" in str(e)
    else:
        raise AssertionError("an unknown recipe was accepted")
    p = slot_study.build_parser()
    assert p.parse_args([]).recipe == "d3"
    assert p.parse_args(["--recipe", "bigrec"]).recipe == "bigrec"


def test_generated_titles_summary_by_hand(tmp_path):
    """bench/generated_titles.py: distinct generated titles, the most common one's share,
    own-title share, on hand-made predictions; a constrained-mode file is refused."""
    import json

    import generated_titles as gt
    rows = [{"generated": '"Greatest Hits"\n', "target_title": "Abbey Road"},
            {"generated": "Greatest Hits", "target_title": "Greatest Hits"},
            {"generated": " Greatest Hits ", "target_title": "Kind of Blue"},
            {"generated": "Kind of Blue", "target_title": "Kind of Blue"},
            {"generated": "", "target_title": "Blue Train"}]
    s = gt.summarise(rows, top=2)
    assert s["users"] == 5 and s["distinct_generated"] == 3
    assert s["most_common"] == [{"title": "Greatest Hits", "users": 3},
                                {"title": "Kind of Blue", "users": 1}]
    assert abs(s["most_common_share"] - 0.6) < 1e-12
    assert abs(s["generated_is_target"] - 0.4) < 1e-12
    folder = tmp_path / "eval_valid_bigrec"
    folder.mkdir()
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "summary.json"
    assert gt.main([str(folder), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["files"]
    assert list(got.values())[0]["distinct_generated"] == 3
    (folder / "predictions.jsonl").write_text(json.dumps({"target_title": "x"}) + "\n")
    try:
        gt.main([str(folder)])
    except SystemExit as e:
        assert "predictions.jsonl" in str(e) and "bigrec" in str(e)
    else:
        raise AssertionError("a file without generated titles was accepted")
