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
