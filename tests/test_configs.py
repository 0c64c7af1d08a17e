"""Every config file loads through the real command-line parser and validates; the paper
config carries the release's hyperparameters (SPEC.md sections 3, 5, 6, 7) and an
up-to-date memory table."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from latentr3_jax import cli
from latentr3_jax.config import base_config, flat_items, parse_config, validate
from latentr3_jax.errors import InputError
from latentr3_jax.parallel import memory

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER_PATH = CONFIGS / "paper.py"
# SPEC.md section 3 (the release's words; a readable lower-case name for the others)
PAPER = {"cds": ("CDs_and_Vinyl", "musics"), "toys": ("Toys_and_Games", "toys and games"),
         "games": ("Video_Games", "video games"),
         "instruments": ("Musical_Instruments", "music instruments"),
         "industrial": ("Industrial_and_Scientific", "industrial and scientific"),
         "office": ("Office_Products", "office products")}


def _paper():
    spec = importlib.util.spec_from_file_location("paper_config_under_test", PAPER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MESH_PRESETS = _paper().MESH_PRESETS
# every config file; paper.py with every dataset, each variant word and a mix of them
SPECS = sorted(str(p.name) for p in CONFIGS.glob("*.py") if p.name != "paper.py")
SPECS += [f"paper.py:{d}" for d in PAPER]
SPECS += [f"paper.py:{d},bigrec,base" for d in PAPER]
SPECS += [f"paper.py:cds,{m}" for m in MESH_PRESETS]
SPECS += ["paper.py:d3,latent,office,tpu-v5p-16"]
BASE_KEYS = set(flat_items(base_config()))


def _load(spec: str, *overrides: str):
    return parse_config(["--config", str(CONFIGS / spec), *overrides])[0]


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_loads_with_only_base_keys_and_validates(spec):
    cfg = _load(spec)
    assert set(flat_items(cfg)) == BASE_KEYS
    validate(cfg)


@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_paper_config_has_the_release_hyperparameters(dataset):
    cfg = _load(f"paper.py:{dataset}")
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


def test_paper_category_words_match_the_data_layer():
    """The words the config sets are what the D3 reader would derive from the folder."""
    from latentr3_jax.data import category_word
    for folder, word in PAPER.values():
        assert category_word(folder) == word


def test_variants_and_overrides():
    cfg = _load("paper.py:toys,bigrec,base,tpu-v5p-16", "--config.model.hf_path=/models/qwen",
                "--config.dataset_dir=/d/Toys")
    assert (cfg.data.template, cfg.eval.mode, cfg.model.num_thoughts) == ("bigrec", "bigrec", 0)
    assert cfg.eval.grounding_beams == 4 and cfg.eval.max_new_tokens == cfg.data.max_target_len
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 4, 1)
    assert cfg.model.hf_path == "/models/qwen" and cfg.dataset_dir == "/d/Toys"
    # variants and datasets do not share a run directory
    workdirs = {_load(s).workdir for s in ("paper.py:toys", "paper.py:toys,bigrec",
                                          "paper.py:toys,base", "paper.py:cds")}
    assert len(workdirs) == 4
    assert _load("paper.py:bigrec,cds").workdir == _load("paper.py:cds,bigrec").workdir


@pytest.mark.parametrize("arg, words", [
    ("", ["needs a dataset", "cds, toys, games, instruments, industrial, office"]),
    ("bigrec,tpu-v4-8", ["needs a dataset", "configs/paper.py:cds"]),
    ("cds,d4", ["unknown config variant 'd4'", "dataset: cds"]),
    ("cds,toys", ["two dataset choices: cds and toys"]),
    ("cds,bigrec,d3", ["two recipe choices"]),
])
def test_bad_paper_variants_are_one_line(arg, words):
    spec = str(PAPER_PATH) + (f":{arg}" if arg else "")
    with pytest.raises(InputError) as err:
        parse_config(["--config", spec])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"config file {spec}: ")
    for w in words:
        assert w in msg, msg


def test_unknown_override_key_names_it():
    with pytest.raises(InputError, match="config has no key 'model.no_such_key'"):
        _load("paper.py:cds", "--config.model.no_such_key=1")


def test_mesh_presets_match_their_device_counts():
    for name, p in MESH_PRESETS.items():
        cfg = _load(f"paper.py:cds,{name}")
        assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == p["devices"], name
        assert cfg.sft.batch_size % (cfg.mesh.data * cfg.mesh.fsdp) == 0
        assert p["devices"] % p["hosts"] == 0


def test_memory_table_is_current_and_fits():
    paper = _paper()
    doc = PAPER_PATH.read_text(encoding="utf-8")
    assert paper.memory_table() in doc, \
        "configs/paper.py: stale memory table; run python configs/paper.py"
    model = memory.qwen25_1_5b()
    for name, p in MESH_PRESETS.items():
        for dataset in PAPER:   # the table holds for every dataset
            est = memory.config_estimates(paper.get_config(f"{dataset},{name}"), p["devices"],
                                          decoder_config=model)
            for step in ("sft", "grpo"):
                assert est[step]["total_bytes"] < 0.8 * p["hbm_gib"] * memory.GIB, (name, step)


def test_memory_table_regenerates_in_place(tmp_path):
    """`python configs/paper.py` rewrites the table between its markers and nothing else."""
    paper = _paper()
    text = PAPER_PATH.read_text(encoding="utf-8")
    stale = text.replace("| tpu-v4-8 | 1,4,1 | sft |", "| tpu-v4-8 | 9,9,9 | sft |", 1)
    assert stale != text
    copy = tmp_path / "paper.py"
    copy.write_text(stale, encoding="utf-8")
    assert paper.rewrite_docstring(str(copy)) is True
    assert copy.read_text(encoding="utf-8") == text
    assert paper.rewrite_docstring(str(copy)) is False


def test_memory_cli(capsys):
    path = str(PAPER_PATH)
    assert cli.main(["memory", "--model", "qwen2.5-1.5b", "--config", f"{path}:cds,tpu-v4-8"]) == 0
    out = capsys.readouterr().out
    assert "1,4,1" in out and "| sft | 32 |" in out and "| grpo | 64 |" in out
    assert cli.main(["memory", "--config", f"{path}:cds"]) == 2  # placeholder hf_path: no config.json
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
    cfg = _load("paper.py:games,tpu-v4-8", f"--config.model.hf_path={tmp_path}")
    qwen = memory.qwen25_1_5b(vocab_size=151936 + 1)
    assert memory.decoder_config_from_cfg(cfg).num_params() == qwen.num_params()
    assert memory.config_estimates(cfg) == memory.config_estimates(cfg, decoder_config=qwen)


@pytest.mark.parametrize("arg", ["cds", "industrial,cpu", "office,bigrec", "cds,cpu,bigrec",
                                 "cds,gpu", "industrial,gpu,bigrec"])
def test_smollm2_variants(arg):
    cfg = _load(f"smollm2.py:{arg}")
    validate(cfg, stage="study")
    assert cfg.model.hf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.pipeline.base_epochs == 0 and cfg.sft.batch_size == (32 if "cpu" in arg else 128)
    assert cfg.sft.batch_size % (cfg.sft.micro_batch_size or cfg.sft.batch_size) == 0
    assert ("cpu" in arg) == (cfg.data.max_train_rows > 0) == (cfg.model.dtype == "float32")
    assert ("gpu" in arg) == (cfg.data.buckets == (256, 512)) == (cfg.eval.batch_size == 128)
    assert cfg.grpo.select == "best"
    with pytest.raises(InputError, match="one dataset"):
        _load("smollm2.py:cds,industrial")
    with pytest.raises((InputError, ValueError), match="exclude each other"):
        _load("smollm2.py:cds,cpu,gpu")
