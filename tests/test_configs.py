"""Every config file loads through the real command-line parser; the paper configs carry the
release's hyperparameters (SPEC.md sections 3, 5, 6, 7) and an up-to-date memory table."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from latentr3_jax.config import base_config
from latentr3_jax.configlib import parse_config
from latentr3_jax.errors import InputError
from latentr3_jax.parallel import memory

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.py") if p.name != "presets.py")
PAPER = {"cds": ("CDs_and_Vinyl", "musics"), "toys": ("Toys_and_Games", "toys and games"),
         "games": ("Video_Games", "video games"),
         "instruments": ("Musical_Instruments", "music instruments")}


def _presets():
    spec = importlib.util.spec_from_file_location("presets_under_test", CONFIGS / "presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat_keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


BASE_KEYS = _flat_keys(base_config().to_dict())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_with_only_base_keys(path):
    cfg, _ = parse_config(["--config", str(path)])
    assert _flat_keys(cfg.to_dict()) == BASE_KEYS


def test_all_paper_configs_exist():
    names = {p.name for p in CONFIG_FILES}
    assert {f"paper_{d}.py" for d in PAPER} <= names


@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_paper_config_has_the_release_hyperparameters(dataset):
    cfg, _ = parse_config(["--config", str(CONFIGS / f"paper_{dataset}.py")])
    folder, word = PAPER[dataset]
    assert cfg.dataset == "d3" and cfg.dataset_dir.endswith("/" + folder)
    assert cfg.data.category == word and cfg.data.cutoff == 512
    assert cfg.model.hf_path == "/path/to/Qwen2.5-1.5B" and cfg.model.dtype == "bfloat16"
    assert cfg.model.num_thoughts == 1 and cfg.model.latent_mode == "ratt"
    s = cfg.sft
    assert (s.learning_rate, s.warmup_steps, s.batch_size, s.epochs, s.patience) == (3e-4, 20, 128, 3, 1)
    g = cfg.grpo
    assert (g.group_size, g.sigma, g.prompts_per_batch, g.learning_rate, g.warmup_steps) == (8, 1.5, 32, 5e-5, 200)
    assert (g.clip_low, g.clip_high, g.kl_beta, g.epochs, g.advantage) == (0.2, 0.28, 0.0, 1, "batch")
    assert not g.train_llm
    e = cfg.eval
    assert (cfg.data.template, e.mode, e.num_beams, e.length_penalty) == ("latentr3", "constrained", 10, 1.0)
    assert max(cfg.data.buckets) == cfg.data.cutoff
    assert max(cfg.data.target_buckets) == cfg.data.max_target_len


def test_variants_and_overrides():
    path = str(CONFIGS / "paper_toys.py")
    cfg, _ = parse_config(["--config", f"{path}:bigrec,base,tpu-v5p-16",
                           "--config.model.hf_path=/models/qwen", "--config.dataset_dir=/d/Toys"])
    assert (cfg.data.template, cfg.eval.mode, cfg.model.num_thoughts) == ("bigrec", "bigrec", 0)
    assert cfg.eval.grounding_beams == 4 and cfg.eval.max_new_tokens == cfg.data.max_target_len
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 4, 1)
    assert cfg.model.hf_path == "/models/qwen" and cfg.dataset_dir == "/d/Toys"
    assert cfg.workdir != parse_config(["--config", path])[0].workdir  # variants do not share a run dir
    with pytest.raises(InputError, match="unknown config variant"):
        parse_config(["--config", f"{path}:d4"])
    with pytest.raises(InputError):
        parse_config(["--config", path, "--config.model.no_such_key=1"])


def test_mesh_presets_match_their_device_counts():
    presets = _presets()
    for name, p in presets.MESH_PRESETS.items():
        cfg, _ = parse_config(["--config", f"{CONFIGS / 'paper_cds.py'}:{name}"])
        assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == p["devices"], name
        assert cfg.sft.batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0
        assert p["devices"] % p["hosts"] == 0


def test_memory_tables_are_current_and_fit():
    presets = _presets()
    model = memory.qwen25_1_5b()
    for dataset in PAPER:
        doc = (CONFIGS / f"paper_{dataset}.py").read_text(encoding="utf-8")
        assert presets.memory_table(dataset) in doc, \
            f"paper_{dataset}.py: stale memory table; run python configs/presets.py"
    for name, p in presets.MESH_PRESETS.items():
        est = memory.config_estimates(presets.paper_config("cds", name), p["devices"],
                                      decoder_config=model)
        for step in ("sft", "grpo"):
            assert est[step]["total_bytes"] < 0.8 * p["hbm_gib"] * memory.GIB, (name, step)


def test_memory_cli(capsys):
    path = str(CONFIGS / "paper_cds.py")
    assert memory.main(["--model", "qwen2.5-1.5b", "--config", f"{path}:tpu-v4-8"]) == 0
    out = capsys.readouterr().out
    assert "1,4,1" in out and "| sft | 32 |" in out and "| grpo | 64 |" in out
    assert memory.main(["--config", path]) == 2  # placeholder hf_path: no config.json
    assert "config.json" in capsys.readouterr().err


def test_memory_reads_the_checkpoint_shape(tmp_path):
    """A transformers-written Qwen2.5-1.5B config.json gives the built-in shape (with the
    checkpoint's padded table plus the <|Thought|> row)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                  num_hidden_layers=28, num_attention_heads=12,
                                  num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=1000000.0, max_position_embeddings=131072,
                                  architectures=["Qwen2ForCausalLM"])
    hf.save_pretrained(tmp_path)
    cfg, _ = parse_config(["--config", f"{CONFIGS / 'paper_games.py'}:tpu-v4-8",
                           f"--config.model.hf_path={tmp_path}"])
    qwen = memory.qwen25_1_5b(vocab_size=151936 + 1)
    assert memory.decoder_config_from_cfg(cfg).num_params() == qwen.num_params()
    assert memory.config_estimates(cfg) == memory.config_estimates(cfg, decoder_config=qwen)
