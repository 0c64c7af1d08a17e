"""`sft.init_from`: an SFT run that starts from another run's best weights (the pipeline's
shared N = 0 base stage), and the pipeline's base stage wiring."""

import json
import os

import jax
import numpy as np
import pytest

from latentr3_jax import data, pipeline
from latentr3_jax.config import default_config_file, parse_config
from latentr3_jax.errors import InputError
from latentr3_jax.model import latent
from latentr3_jax.train import setup
from latentr3_jax.train.sft import train_sft
from latentr3_jax.train import fingerprint, runs


def tiny_cfg(workdir, *overrides):
    cfg, _ = parse_config(["--config", default_config_file("sft_tiny.py"),
                           f"--config.workdir={workdir}", "--config.data.max_train_rows=40",
                           "--config.data.max_eval_rows=8", "--config.sft.max_steps=3",
                           *overrides])
    return cfg


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(jax.device_get(a))
    lb, tb = jax.tree.flatten(jax.device_get(b))
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished N = 0 run (3 steps)."""
    d = str(tmp_path_factory.mktemp("init_from") / "base")
    train_sft(tiny_cfg(d, "--config.model.num_thoughts=0"), progress=False)
    return d


def test_build_model_takes_the_runs_weights_and_a_fresh_latent_module(base_run, tmp_path):
    # the shape comes from the run; a different hidden_size in the config is not used
    cfg = tiny_cfg(tmp_path / "x", f"--config.sft.init_from={base_run}",
                   "--config.model.num_thoughts=1", "--config.model.hidden_size=64")
    base = runs.load_run(base_run, which="best")
    key = jax.random.PRNGKey(7)
    config, params = setup.build_model(cfg, base.tokenizer, key)
    assert config.to_dict() == base.model_config.to_dict()
    assert config.hidden_size == 32
    assert set(params) == set(base.params) | {"latent"}
    _assert_trees_equal({k: v for k, v in params.items() if k != "latent"}, base.params)
    _assert_trees_equal(params["latent"], latent.init_latent_params(config, jax.random.split(key)[1]))


def test_latent_module_carries_over_from_a_latent_run(base_run, tmp_path):
    first = str(tmp_path / "n1")
    train_sft(tiny_cfg(first, f"--config.sft.init_from={base_run}", "--config.model.num_thoughts=1"),
              progress=False)
    art = runs.load_run(first, which="best")
    assert art.num_thoughts == 1 and "latent" in art.params
    cfg = tiny_cfg(tmp_path / "n1_more", f"--config.sft.init_from={first}",
                   "--config.model.num_thoughts=1")
    _, params = setup.build_model(cfg, art.tokenizer, jax.random.PRNGKey(3))
    _assert_trees_equal(params, art.params)


def test_sft_run_from_a_run_keeps_its_tokenizer_and_model(base_run, tmp_path):
    run = str(tmp_path / "from_base")
    summary = train_sft(tiny_cfg(run, f"--config.sft.init_from={base_run}",
                                 "--config.model.num_thoughts=1"), progress=False)
    assert summary["steps"] == 3
    base = runs.load_run(base_run, which="best")
    art = runs.load_run(run, which="latest")
    assert fingerprint.tokenizer_fingerprint(art.tokenizer) == fingerprint.tokenizer_fingerprint(base.tokenizer)
    assert art.model_config.to_dict() == base.model_config.to_dict()
    assert json.loads(open(os.path.join(run, runs.CONFIG)).read())["sft"]["init_from"] == base_run
    # it trained: the decoder moved away from the base weights
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(art.params["layers"])),
                                                      jax.tree.leaves(jax.device_get(base.params["layers"])))]
    assert any(moved)


def test_init_from_errors(base_run, tmp_path):
    with pytest.raises(InputError, match="sft.init_from and model.hf_path are both set"):
        train_sft(tiny_cfg(tmp_path / "a", f"--config.sft.init_from={base_run}",
                           f"--config.model.hf_path={tmp_path}"), progress=False)
    with pytest.raises(InputError, match="run directory .*nowhere not found"):
        train_sft(tiny_cfg(tmp_path / "b", f"--config.sft.init_from={tmp_path / 'nowhere'}"),
                  progress=False)
    # a tokenizer other than the init run's is refused, naming what differs
    other_cfg = tiny_cfg(tmp_path / "c", "--config.tokenizer.vocab_size=300")
    other = data.make_tokenizer(other_cfg, data.load_dataset(other_cfg))
    other.save(str(tmp_path / "tok300"))
    with pytest.raises(InputError, match="tokenizer differs from this run's.*vocab_size"):
        train_sft(tiny_cfg(tmp_path / "d", f"--config.sft.init_from={base_run}",
                           f"--config.tokenizer.path={tmp_path / 'tok300'}"), progress=False)


def test_pipeline_base_stage_config(tmp_path):
    cfg, _ = parse_config(["--config", default_config_file("demo.py"),
                           "--config.pipeline.base_epochs=2", "--config.sft.epochs=3",
                           "--config.model.hf_path=/models/qwen"])
    base = pipeline._base_config(cfg, str(tmp_path))
    assert base.workdir == os.path.join(str(tmp_path), "base")
    assert base.model.num_thoughts == 0 and base.sft.epochs == 2
    assert base.model.hf_path == "/models/qwen"          # the base stage starts from it
    for name in ("sft_baseline", "sft_latentr3"):
        v = pipeline._variant_config(cfg, name, str(tmp_path), base)
        assert v.sft.init_from == base.workdir and v.model.hf_path == "" and v.sft.epochs == 3
    g = pipeline._variant_config(cfg, "lr_grpo", str(tmp_path), base)
    assert g.grpo.init_from == os.path.join(str(tmp_path), "sft_latentr3") and not g.sft.init_from
    cfg.pipeline.base_epochs = 0
    assert pipeline._base_config(cfg, str(tmp_path)) is None
    cfg.pipeline.base_epochs = -1
    with pytest.raises(InputError, match="base_epochs must be >= 0"):
        pipeline.run_pipeline(cfg)     # validated before any work
