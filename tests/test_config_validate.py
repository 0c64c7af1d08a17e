"""config.validate: every key is checked for type and range, the constraints between keys
and the stage's own needs hold, and every problem is one line naming the key."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import ml_collections
import pytest

from latentr3_jax import config as C
from latentr3_jax.config import base_config, flat_items, parse_config, validate
from latentr3_jax.errors import InputError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _paper_variants():
    spec = importlib.util.spec_from_file_location("paper_for_validate", CONFIGS / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    v = module.VARIANTS
    return [f"{d},{r},{t}" + (f",{m}" if m else "")
            for d in v["dataset"] for r in v["recipe"] for t in v["thoughts"]
            for m in ("",) + v["mesh"]]


SPECS = [p.name for p in sorted(CONFIGS.glob("*.py")) if p.name != "paper.py"]
SPECS += [f"paper.py:{arg}" for arg in _paper_variants()]


def _with(**changes):
    """The base config with `changes` ({'a__b': value} sets a.b), types free to change."""
    d = base_config().to_dict()
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict(d)


def _problem(cfg, stage=None) -> str:
    with pytest.raises(InputError) as err:
        validate(cfg, stage)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- good configs


def test_rules_cover_exactly_the_base_keys():
    assert set(C.RULES) == set(flat_items(base_config()))


def test_docs_cover_exactly_the_base_keys():
    """`latentr3 <command> --help` has a meaning for every key and for no other."""
    assert set(C.DOCS) == set(flat_items(base_config()))
    assert all(text.strip() and "\n" not in text for text in C.DOCS.values())
    sections = {k.split(".", 1)[0] if "." in k else "" for k in C.DOCS}
    assert sections == set(C.SECTION_DOCS)


@pytest.mark.parametrize("stage", [None, "sft"])
def test_base_config_passes(stage):
    validate(base_config(), stage)


def test_stage_needs_are_met_when_set():
    validate(_with(grpo__init_from="runs/sft"), "grpo")
    validate(_with(eval__checkpoint="runs/sft"), "evaluate")
    validate(base_config(), "run")


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_file_and_variant_passes(spec):
    cfg, _ = parse_config(["--config", str(CONFIGS / spec)])
    validate(cfg)
    validate(cfg, "sft")
    if cfg.model.num_thoughts:
        validate(cfg, "run")


def test_accepted_spellings():
    for value in ("auto", "true", "False", True, False):
        validate(_with(model__scan_layers=value))
    validate(_with(data__target_buckets=()))          # one bucket of max_target_len
    validate(_with(mesh__data=4, mesh__fsdp=-1))      # one free axis
    validate(_with(sft__epochs=0, sft__max_steps=10))
    validate(_with(distributed__coordinator_address="10.0.0.2:1234",
                   distributed__num_processes=2, distributed__process_id=1))
    validate(_with(sft__learning_rate=1))             # an int where a float is expected


def test_grpo_options_accepted():
    validate(_with(grpo__sigma_final=0.1, grpo__sigma_schedule="cosine", grpo__advantage="rloo",
                   grpo__group_size=3, grpo__latent_trust=0.5, grpo__diagnose_every=10))
    validate(_with(grpo__sigma_final=-1, grpo__advantage="group_mean", grpo__group_size=2))


def test_constant_sets_match_the_modules_that_use_them():
    """config.py repeats (or will own) the allowed sets; they must say the same."""
    from latentr3_jax import data
    from latentr3_jax.data import prompts
    from latentr3_jax.model import config as model_config, latent
    from latentr3_jax.train import grpo
    assert C.MODEL_TYPES == tuple(model_config.ARCHITECTURES)
    assert C.LATENT_MODES == tuple(latent.LATENT_MODES)
    assert C.LATENT_INITS == tuple(latent.LATENT_INITS)
    assert C.DATASETS == tuple(data.DATASETS)
    assert C.TEMPLATES == tuple(prompts.TEMPLATES)
    assert C.ADVANTAGES == tuple(grpo.ADVANTAGES) and C.ESTIMATORS == tuple(grpo.ESTIMATORS)
    assert C.SIGMA_SCHEDULES == tuple(grpo.SIGMA_SCHEDULES)


# --------------------------------------------------------------------------- one key bad

BAD = [  # key, bad value, what the message says
    ("seed", -1, "must be >= 0"),
    ("seed", True, "must be an integer"),
    ("workdir", "", "must not be empty"),
    ("dataset", "csv", "must be one of synthetic, d3, tfds"),
    ("dataset_dir", None, "must be a string"),
    ("data.category", 3, "must be a string"),
    ("data.template", "alpaca", "must be one of latentr3, bigrec"),
    ("data.cutoff", 0, "must be >= 1"),
    ("data.buckets", (128, 64), "must be strictly increasing"),
    ("data.buckets", (), "must not be empty"),
    ("data.buckets", ("abc",), "must be a tuple of integers, such as (16, 32)"),
    ("data.max_target_len", 0, "must be >= 1"),
    ("data.target_buckets", (0, 16), "must hold only values >= 1"),
    ("data.tfds_name", None, "must be a string"),
    ("data.skip_invalid", "yes", "must be true or false"),
    ("data.max_train_rows", -2, "must be -1 or >= 0"),
    ("data.max_eval_rows", 1.5, "must be an integer"),
    ("data.synthetic.num_items", 10, "must be >= 16"),
    ("data.synthetic.num_items", 5000, "must be <= 2240"),
    ("data.synthetic.num_users", 0, "must be >= 1"),
    ("data.synthetic.seed", -3, "must be >= 0"),
    ("tokenizer.path", None, "must be a string"),
    ("tokenizer.vocab_size", 100, "must be >= 260"),
    ("tokenizer.split", "bert", "must be one of qwen, gpt2"),
    ("tokenizer.min_frequency", -1, "must be >= 0"),
    ("model.hf_path", 0, "must be a string"),
    ("model.model_type", "gpt2", "must be one of qwen2, llama"),
    ("model.hidden_size", 0, "must be >= 1"),
    ("model.intermediate_size", -8, "must be >= 1"),
    ("model.num_layers", 0, "must be >= 1"),
    ("model.num_heads", 0, "must be >= 1"),
    ("model.num_kv_heads", 0, "must be >= 1"),
    ("model.rope_theta", 0.0, "must be > 0"),
    ("model.tie_word_embeddings", 1, "must be true or false"),
    ("model.num_thoughts", -1, "must be >= 0"),
    ("model.latent_mode", "mean", "must be one of ratt, hidden"),
    ("model.dtype", "float16", "must be one of float32, bfloat16"),
    ("model.remat", "no", "must be true or false"),
    ("model.scan_layers", "sometimes", "must be auto, true or false"),
    ("mesh.data", 0, "must be -1 or >= 1"),
    ("mesh.fsdp", -2, "must be -1 or >= 1"),
    ("mesh.tensor", 0, "must be -1 or >= 1"),
    ("distributed.coordinator_address", None, "must be a string"),
    ("distributed.num_processes", -1, "must be >= 0"),
    ("distributed.process_id", -2, "must be -1 or >= 0"),
    ("sft.init_from", None, "must be a string"),
    ("sft.learning_rate", 0.0, "must be > 0"),
    ("sft.learning_rate", math.nan, "must be a finite number"),
    ("sft.learning_rate", "1e-4", "must be a finite number"),
    ("sft.warmup_steps", -1, "must be >= 0"),
    ("sft.batch_size", 0, "must be >= 1"),
    ("sft.micro_batch_size", -1, "must be >= 0"),
    ("sft.epochs", -1, "must be >= 0"),
    ("sft.max_steps", 0, "must be -1 or >= 1"),
    ("sft.patience", 0, "must be >= 1"),
    ("sft.weight_decay", -0.1, "must be >= 0"),
    ("sft.grad_clip", -1.0, "must be >= 0"),
    ("sft.log_every", 0, "must be >= 1"),
    ("sft.checkpoint_every", 0, "must be >= 1"),
    ("sft.keep_checkpoints", 0, "must be >= 1"),
    ("sft.max_bad_steps", 0, "must be >= 1"),
    ("sft.eval_batch_size", -1, "must be >= 0"),
    ("grpo.init_from", 1, "must be a string"),
    ("grpo.group_size", 1, "must be >= 2"),
    ("grpo.sigma", 0.0, "must be > 0"),
    ("grpo.learning_rate", -5e-5, "must be > 0"),
    ("grpo.warmup_steps", -1, "must be >= 0"),
    ("grpo.prompts_per_batch", 0, "must be >= 1"),
    ("grpo.micro_batch_size", -4, "must be >= 0"),
    ("grpo.epochs", -1, "must be >= 0"),
    ("grpo.max_steps", -5, "must be -1 or >= 1"),
    ("grpo.sigma_final", 0.0, "must be -1 or > 0"),
    ("grpo.sigma_final", -2.0, "must be -1 or > 0"),
    ("grpo.sigma_schedule", "step", "must be one of linear, cosine"),
    ("grpo.advantage", "token", "must be one of batch, group, grpo, rloo, group_mean"),
    ("grpo.estimator", "a2c", "must be one of ppo, reinforce, pathwise"),
    ("grpo.clip_low", 1.0, "must be < 1"),
    ("grpo.clip_low", -0.1, "must be >= 0"),
    ("grpo.clip_high", -0.1, "must be >= 0"),
    ("grpo.iterations", 0, "must be >= 1"),
    ("grpo.kl_beta", -1.0, "must be >= 0"),
    ("grpo.latent_trust", -0.1, "must be >= 0"),
    ("grpo.latent_trust", math.nan, "must be a finite number"),
    ("grpo.diagnose_every", -1, "must be >= 0"),
    ("grpo.reward", "ndcg", "must be one of perplexity, contrastive"),
    ("grpo.negatives", 0, "must be >= 1"),
    ("grpo.negative_source", "catalog", "must be one of batch, model"),
    ("grpo.remine_every", -1, "must be >= 0"),
    ("grpo.weight_decay", -1.0, "must be >= 0"),
    ("grpo.train_llm", "no", "must be true or false"),
    ("grpo.grad_clip", math.inf, "must be a finite number"),
    ("grpo.log_every", 0, "must be >= 1"),
    ("grpo.checkpoint_every", 0, "must be >= 1"),
    ("grpo.keep_checkpoints", 0, "must be >= 1"),
    ("grpo.max_bad_steps", 0, "must be >= 1"),
    ("grpo.evaluate", None, "must be true or false"),
    ("grpo.eval_every", -1, "must be >= 0"),
    ("grpo.select", "first", "must be one of best, last"),
    ("pipeline.base_epochs", -1, "must be >= 0"),
    ("eval.checkpoint", 3, "must be a string"),
    ("eval.split", "dev", "must be one of train, valid, test"),
    ("eval.mode", "greedy", "must be one of constrained, bigrec"),
    ("eval.num_beams", 0, "must be >= 1"),
    ("eval.length_penalty", math.inf, "must be a finite number"),
    ("eval.batch_size", 0, "must be >= 1"),
    ("eval.max_users", -5, "must be -1 or >= 0"),
    ("eval.ks", (0, 5), "must hold only values >= 1"),
    ("eval.ks", (), "must not be empty"),
    ("eval.output_dir", None, "must be a string"),
    ("eval.data_from_run", "yes", "must be true or false"),
    ("eval.grounding_beams", 0, "must be >= 1"),
    ("eval.max_new_tokens", 0, "must be >= 1"),
    ("eval.resume", None, "must be true or false"),
    ("eval.progress", 0, "must be true or false"),
    ("eval.latent_samples", 0, "must be >= 1"),
    ("eval.latent_sigma", -0.5, "must be >= 0"),
    ("eval.latent_combine", "mean", "must be one of logmeanexp, max"),
    ("model.latent_init", "zeros", "must be one of normal, identity"),
    ("model.latent_factors", 0, "must be >= 1"),
    ("sft.latent_lr_scale", 0.0, "must be > 0"),
    ("sft.latent_diversity", -1.0, "must be >= 0"),
    ("sft.slot_bottleneck", 1.0, "must be < 1"),
    ("study.seeds", (-1,), "must hold only values >= 0"),
    ("study.bootstrap", 10, "must be >= 100"),
    ("study.sasrec", "no", "must be true or false"),
    ("study.report_only", "maybe", "must be true or false"),
]


@pytest.mark.parametrize("key, value, words", BAD, ids=lambda x: str(x))
def test_a_bad_value_is_one_line_naming_the_key(key, value, words):
    msg = _problem(_with(**{key.replace(".", "__"): value}))
    assert msg == f"config {key} {words}, got {value!r}"


def test_bad_values_cover_most_keys():
    assert len({key for key, _, _ in BAD}) >= 0.9 * len(C.RULES)


# --------------------------------------------------------------------------- between keys

RELATIONS = [  # changes, what the message starts with
    (dict(dataset="d3"), "config dataset_dir must be set for dataset=d3"),
    (dict(dataset="tfds", dataset_dir="  "), "config dataset_dir must be set for dataset=tfds"),
    (dict(model__hidden_size=130),
     "config model.hidden_size must be a multiple of model.num_heads 4, got 130"),
    (dict(model__num_kv_heads=3),
     "config model.num_heads must be a multiple of model.num_kv_heads 3, got 4"),
    (dict(sft__init_from="runs/a", model__hf_path="/models/q"),
     "config sft.init_from and model.hf_path are both set"),
    (dict(mesh__data=-1, mesh__tensor=-1), "config mesh.data and mesh.tensor are each -1"),
    (dict(distributed__coordinator_address="localhost"),
     "config distributed.coordinator_address must be HOST:PORT"),
    (dict(distributed__num_processes=2, distributed__process_id=2),
     "config distributed.process_id must be < distributed.num_processes 2, got 2"),
    (dict(sft__micro_batch_size=48), "config sft.micro_batch_size must divide sft.batch_size 128"),
    (dict(grpo__micro_batch_size=5),
     "config grpo.micro_batch_size must divide grpo.prompts_per_batch 32"),
    (dict(sft__epochs=0), "config sft.epochs or sft.max_steps must be positive, got 0 and -1"),
    (dict(grpo__epochs=0), "config grpo.epochs or grpo.max_steps must be positive"),
    (dict(grpo__advantage="rloo", grpo__group_size=2),
     "config grpo.group_size must be >= 3 for grpo.advantage=rloo"),
]


@pytest.mark.parametrize("changes, start", RELATIONS, ids=lambda x: str(x))
def test_constraints_between_keys(changes, start):
    assert _problem(_with(**changes)).startswith(start)


STAGES = [  # stage, changes, what the message starts with
    ("grpo", {}, "config grpo.init_from must be set for grpo"),
    ("evaluate", {}, "config eval.checkpoint must be set for evaluate"),
    ("run", dict(model__num_thoughts=0), "config model.num_thoughts must be >= 1 for run"),
    ("run", dict(pipeline__base_epochs=3, sft__init_from="runs/base"),
     "config pipeline.base_epochs and sft.init_from are both set"),
]


@pytest.mark.parametrize("stage, changes, start", STAGES, ids=lambda x: str(x))
def test_what_a_stage_needs(stage, changes, start):
    cfg = _with(**changes)
    assert _problem(cfg, stage).startswith(start)
    validate(cfg, None if stage == "run" else "sft")   # other stages do not ask for it


def test_unknown_stage_is_a_programming_error():
    with pytest.raises(ValueError, match="stage"):
        validate(base_config(), "train")


def test_unknown_and_missing_keys():
    extra = base_config()
    extra.model.num_beams = 4
    assert _problem(extra) == "config has no key 'model.num_beams'; did you mean eval.num_beams?"
    d = base_config().to_dict()
    del d["sft"]["patience"]
    assert _problem(ml_collections.ConfigDict(d)).startswith("config is missing key 'sft.patience'")


def test_reads_no_files(monkeypatch):
    """Placeholder paths validate: existence is for the readers (they name the path)."""
    import builtins
    import os

    def refuse(*a, **k):
        raise AssertionError("validate touched the file system")
    cfg = _with(dataset="d3", dataset_dir="/nowhere", grpo__init_from="/nowhere/run",
                eval__checkpoint="/nowhere/run", tokenizer__path="/nowhere/tok")
    with monkeypatch.context() as m:
        for name in ("exists", "isdir", "isfile"):
            m.setattr(os.path, name, refuse)
        m.setattr(builtins, "open", refuse)
        validate(cfg, "grpo")


# --------------------------------------------------------------------------- command line
# The CLI calls validate(cfg, stage) right after parse_config(argv); these are its lines.


def _cli(argv, stage):
    with pytest.raises(InputError) as err:
        cfg, _ = parse_config(argv)
        validate(cfg, stage)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("argv, stage, message", [
    (["--config.eval.num_beams=0"], "sft", "config eval.num_beams must be >= 1, got 0"),
    (["--config.eval.ks=0,5"], "evaluate", "config eval.ks must hold only values >= 1, got (0, 5)"),
    (["--config.nonexistent=1"], "sft", "config has no key 'nonexistent'"),
    (["--config.eval.num_beam=3"], "evaluate",
     "config has no key 'eval.num_beam'; did you mean eval.num_beams?"),
    (["--config.num_beams=3"], "sft",
     "config has no key 'num_beams'; did you mean eval.num_beams?"),
    (["--config.learning_rate=1e-3"], "sft",
     "config has no key 'learning_rate'; did you mean grpo.learning_rate or sft.learning_rate?"),
    (["--config.model.nope.deeper=1"], "sft", "config has no key 'model.nope.deeper'"),
    (["--config.model.num_thoughts=abc"], "sft",
     "config model.num_thoughts must be an integer, got 'abc'"),
    (["--config.sft.learning_rate=fast"], "sft",
     "config sft.learning_rate must be a number, got 'fast'"),
    (["--config.sft.learning_rate", "fast"], "sft",
     "config sft.learning_rate must be a number, got 'fast'"),
    (["--config.model.remat=maybe"], "sft",
     "config model.remat must be true or false, got 'maybe'"),
    (["--config.model=3"], "sft",
     "config model is a section: set its keys, as --config.model.NAME=VALUE"),
    (["--config.model.dtype=float16"], "sft",
     "config model.dtype must be one of float32, bfloat16, got 'float16'"),
    (["--config.grpo.group_size=1"], "grpo", "config grpo.group_size must be >= 2, got 1"),
    ([], "grpo", "config grpo.init_from must be set for grpo: the SFT run directory "
                 "(--config.grpo.init_from=DIR)"),
    (["--config", "/nonexistent/config.py"], "sft", "config file /nonexistent/config.py not found"),
])
def test_command_line_messages(argv, stage, message):
    assert _cli(argv, stage) == message


def test_a_broken_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise ValueError('no such\\nthing')\n")
    assert _cli(["--config", str(bad)], "sft") == f"config file {bad}: no such thing"
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(:\n")
    assert _cli(["--config", str(syntax)], "sft").startswith(f"config file {syntax}: ")
