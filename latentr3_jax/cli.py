"""`latentr3` command line: one entry point, one subcommand per job.

This module owns argument parsing and exit codes for every subcommand:
  0    done
  1    training stopped on repeated non-finite steps
  2    bad input (config key, file, data), with a one-line message naming it
  130  interrupted (Ctrl-C outside a training step)
  128 + N  a training run stopped by signal N after saving (rerun the command to resume)

The library modules it calls take configs and paths and raise InputError; none of them
parses a command line. Heavy modules (JAX, the model, data) are imported by the command
that needs them, so `latentr3 --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import re
import shlex
import signal
import sys
from importlib import metadata
from typing import Callable, Optional, Sequence

from latentr3_jax import config as config_lib
from latentr3_jax.errors import InputError


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError (exit 2 with one line) instead of exiting."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def _lazy(name: str):
    """Import a library module when its command runs (start-up cost: JAX, Orbax, TF)."""
    return importlib.import_module(name)


def _config(argv: Sequence[str], *, stage: Optional[str], default: str = "default.py",
            extra_flags=None):
    cfg, fv = config_lib.parse_config(argv, default_file=config_lib.default_config_file(default),
                                      extra_flags=extra_flags)
    config_lib.validate(cfg, stage=stage)
    return cfg, fv


# --------------------------------------------------------------------------- training


def _train(command: str, argv: Sequence[str], train: Callable) -> tuple:
    """Parse, validate and train; a stop signal exits 128 + its number after the trainer
    saved, repeated non-finite steps exit 1; the resume hint is the command line."""
    cfg, _ = _config(argv, stage=command)
    hint = f"latentr3 {command} " + " ".join(shlex.quote(a) for a in argv)
    signals = _lazy("latentr3_jax.train.signals")
    step = _lazy("latentr3_jax.train.step")
    try:
        return 0, cfg, train(cfg, progress=True, resume_hint=hint)
    except signals.StopRequested as e:
        print(f"latentr3 {command}: {e}", file=sys.stderr)
        return 128 + int(getattr(signal, e.signame, signal.SIGTERM)), cfg, None
    except step.NonFiniteError as e:
        print(f"latentr3 {command}: error: {e}", file=sys.stderr)
        return 1, cfg, None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def cmd_sft(argv: Sequence[str]) -> int:
    code, _, s = _train("sft", argv, _lazy("latentr3_jax.train.sft").train_sft)
    if s is not None:
        print(f"sft done: {s['steps']} steps, final train loss {_fmt(s['final_loss'])}, best "
              f"valid loss {_fmt(s['best_valid_loss'])} at step {s['best_step']}; run directory "
              f"{s['run_dir']}")
    return code


def cmd_grpo(argv: Sequence[str]) -> int:
    train_grpo = _lazy("latentr3_jax.train.grpo").train_grpo
    attach = _lazy("latentr3_jax.eval.negatives").attach   # grpo.negative_source=model
    ranking = _lazy("latentr3_jax.eval.selection").valid_ndcg   # grpo.select_metric=ndcg
    code, cfg, s = _train("grpo", argv, functools.partial(train_grpo, negatives=attach,
                                                          valid_ranking=ranking))
    if s is None:
        return code
    print(f"grpo done: {s['steps']} batches ({s['optimizer_steps']} optimizer steps), last mean "
          f"reward {_fmt(s['final_reward_mean'])}, valid reward {_fmt(s['valid_reward_start'])} -> "
          f"{_fmt(s['valid_reward_end'])}; run directory {s['run_dir']}")
    if s["finished"] and cfg.grpo.evaluate:   # HR/NDCG on valid with the trained latent
        evaluate = _lazy("latentr3_jax.eval.evaluate")
        ranking = evaluate.evaluate_run(cfg, s["run_dir"], split="valid", print_table=False,
                                        out_dir=os.path.join(s["run_dir"], f"eval_valid_{cfg.eval.mode}"))
        print("valid ranking: " + ", ".join(
            f"{k} {v:.4f}" for k, v in ranking.items()
            if (k.startswith("HR@") or k.startswith("NDCG@")) and not k.endswith("_id")))
    return code


# --------------------------------------------------------------------------- evaluation, pipeline


def cmd_evaluate(argv: Sequence[str]) -> int:
    cfg, _ = _config(argv, stage="evaluate")
    _lazy("latentr3_jax.eval.evaluate").evaluate_run(cfg, cfg.eval.checkpoint)
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    cfg, _ = _config(argv, stage="run", default="demo.py")
    _lazy("latentr3_jax.pipeline").run_pipeline(cfg)
    return 0


def cmd_study(argv: Sequence[str]) -> int:
    cfg, _ = _config(argv, stage="study", default="demo.py")
    _lazy("latentr3_jax.study").run_study(cfg)
    return 0


# --------------------------------------------------------------------------- conversion


def _export_run(src: str, out: str) -> str:
    """A run directory (or an earlier export) -> HF folder with LatentRATT, its settings and
    the catalog; a params checkpoint (from `convert --hf`) -> plain HF folder."""
    params_io = _lazy("latentr3_jax.model.params_io")
    hf = _lazy("latentr3_jax.hf")
    if os.path.isdir(os.path.join(src, params_io.PARAMS_DIR)):
        config, params = params_io.load_params(src)
        hf.save_pretrained(config, params, out)
        return f"({config.model_type}, {config.num_params() / 1e6:.2f}M params)"
    runs = _lazy("latentr3_jax.train.runs")
    if not (os.path.isdir(os.path.join(src, runs.CHECKPOINTS)) or runs.is_export(src)):
        raise InputError(f"{src}: neither a params checkpoint ({params_io.PARAMS_DIR}/), a run "
                         f"directory ({runs.CHECKPOINTS}/) nor an export ({runs.EXPORT})")
    run = runs.load_run(src)
    stored = runs.load_export_catalog(run.run_dir)
    if stored is None:
        try:
            dataset = _lazy("latentr3_jax.data").load_dataset(run.config)
            stored = (dataset.catalog, dataset.category_word)
        except InputError as e:
            print(f"latentr3 convert: warning: no catalog.json in the export (the run's dataset "
                  f"does not load: {e}); recommend from it with the dataset at hand",
                  file=sys.stderr)
            stored = (None, None)
    runs.export_hf(run, out, catalog=stored[0], category_word=stored[1])
    extra = f", catalog of {len(stored[0])} items" if stored[0] is not None else ""
    k = _lazy("latentr3_jax.model.latent").num_factors(run.params)
    factors = f", {k} latent factors" if k > 1 else ""
    return (f"({run.model_config.model_type}, {run.model_config.num_params() / 1e6:.2f}M "
            f"params, num_thoughts={run.num_thoughts} {run.latent_mode}{factors}{extra})")


def cmd_convert(argv: Sequence[str]) -> int:
    p = _Parser(prog="latentr3 convert",
                description="Hugging Face checkpoint or GGUF file <-> Orbax params checkpoint.")
    p.add_argument("--hf", metavar="PATH", help="Hugging Face checkpoint directory to read")
    p.add_argument("--gguf", metavar="FILE", help="GGUF file (Llama / Qwen2) to write as a "
                                                   "Hugging Face directory (--out)")
    p.add_argument("--to-hf", action="store_true", help="write a Hugging Face directory instead")
    p.add_argument("--from", dest="src", metavar="DIR",
                   help="with --to-hf: a run directory (LatentRATT weights, settings and the "
                        "catalog come along) or a params checkpoint (from `convert --hf`)")
    p.add_argument("--prune-vocab", action="append", metavar="D3_DIR",
                   help="with --gguf or --hf: write a Hugging Face folder keeping only the "
                        "tokens these datasets' prompts and titles use (repeatable)")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    hf = _lazy("latentr3_jax.hf")
    exists = os.path.exists(args.out) and os.listdir(args.out)
    if args.prune_vocab:
        if args.src or args.to_hf or bool(args.gguf) == bool(args.hf):
            raise InputError("--prune-vocab takes --gguf FILE or --hf DIR (and --out)")
        if exists and not args.overwrite:
            raise InputError(f"{args.out}: exists and is not empty (pass --overwrite)")
        src = _lazy("latentr3_jax.gguf_convert").resolve_model_path(args.gguf or args.hf)
        s = _lazy("latentr3_jax.data.vocab_prune").prune_from_folders(src, args.out,
                                                                      args.prune_vocab)
        print(f"wrote Hugging Face checkpoint {args.out}: {s['kept']} of {s['original_vocab']} "
              f"tokens kept ({s['corpus_texts']} prompts and titles encode alike)")
        return 0
    if args.gguf:
        if args.hf or args.src or args.to_hf:
            raise InputError("--gguf takes only --out (and --overwrite)")
        if exists and not args.overwrite:
            raise InputError(f"{args.out}: exists and is not empty (pass --overwrite)")
        out = _lazy("latentr3_jax.gguf_convert").convert_gguf(args.gguf, args.out)
        config = hf.read_hf_config(out)
        print(f"wrote Hugging Face checkpoint {out} ({config.model_type}, "
              f"{config.num_params() / 1e6:.2f}M params) from {args.gguf}")
        return 0
    if args.to_hf:
        if not args.src or args.hf:
            raise InputError("--to-hf needs --from DIR (and no --hf)")
        if exists and not args.overwrite:
            raise InputError(f"{args.out}: exists and is not empty (pass --overwrite)")
        what = _export_run(args.src, args.out)
        print(f"wrote Hugging Face checkpoint {args.out} {what}")
        return 0
    if not args.hf or args.src:
        raise InputError("pass --hf PATH or --gguf FILE (or --to-hf --from DIR)")
    config, params = hf.load_pretrained(args.hf)
    _lazy("latentr3_jax.model.params_io").save_params(
        args.out, params, config, extra={"source": os.path.abspath(args.hf)},
        overwrite=args.overwrite)
    print(f"wrote params checkpoint {args.out} ({config.model_type}, "
          f"{config.num_params() / 1e6:.2f}M params)")
    return 0


# --------------------------------------------------------------------------- recommend, serve


def _recommender(command: str, argv: Sequence[str], extra) -> tuple:
    """(parsed own flags, Recommender). Own flags first; any --config / --config.KEY left
    over sets the eval settings (as `latentr3 evaluate` reads them), else the run's own."""
    ap = _Parser(prog=f"latentr3 {command}", add_help=False)
    ap.add_argument("--run", required=True, metavar="DIR",
                    help="run directory or Hugging Face export folder")
    ap.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    ap.add_argument("--mode", choices=("constrained", "bigrec"), default=None)
    extra(ap)
    args, rest = ap.parse_known_args(list(argv))
    cfg = _config(rest, stage=None)[0] if rest else None
    recommend = _lazy("latentr3_jax.recommend")
    rec = recommend.Recommender.from_run(args.run, config=cfg, mode=args.mode,
                                         which=args.checkpoint)
    return args, rec


def cmd_recommend(argv: Sequence[str]) -> int:
    def extra(ap):
        ap.add_argument("--history", action="append", metavar="TITLE",
                        help="an item title of the history, oldest first (repeat the flag)")
        ap.add_argument("--input", metavar="FILE", help="JSONL of histories (see recommend_io)")
        ap.add_argument("--output", metavar="FILE", help="JSONL of recommendations (resumable)")
        ap.add_argument("--k", type=int, default=None,
                        help="recommendations per history (default 10, at most the beams)")
        ap.add_argument("--overwrite", action="store_true",
                        help="start --output over when it was written with other settings")
        ap.add_argument("--json", action="store_true", help="--history: print JSON")

    args, rec = _recommender("recommend", argv, extra)
    if bool(args.history) == bool(args.input):
        raise InputError("pass --history TITLE (repeatable) or --input FILE --output FILE")
    io = _lazy("latentr3_jax.recommend_io")
    if args.input:
        if not args.output:
            raise InputError("--input needs --output FILE")
        done = io.recommend_file(rec, args.input, args.output, k=args.k,
                                 overwrite=args.overwrite, progress=True)
        print(f"wrote {args.output}: {done['written']} histories now, {done['total']} in all")
        return 0
    (got,) = rec.recommend_with_info([args.history], k=args.k)
    if args.json:
        print(json.dumps(io.record(got), ensure_ascii=False))
        return 0
    if got.truncated:
        print("note: the history is longer than the prompt limit; its oldest items were cut")
    if got.generated is not None:
        print(f"generated title: {got.generated}")
    for rank, r in enumerate(got.items, 1):
        print(f"{rank:>3}  {r.score:>9.4f}  item {r.item_id:<8} {r.title}")
    return 0


def cmd_serve(argv: Sequence[str]) -> int:
    def extra(ap):
        ap.add_argument("--host", default="127.0.0.1")
        ap.add_argument("--port", type=int, default=8080)
        ap.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a request waits for others to share its batch")

    args, rec = _recommender("serve", argv, extra)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: expected 0..65535")
    try:
        _lazy("latentr3_jax.serve").serve(rec, args.host, args.port, max_wait_ms=args.max_wait_ms,
                                          announce=lambda m: print(m, flush=True))
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    return 0


# --------------------------------------------------------------------------- data, memory


def cmd_data(argv: Sequence[str]) -> int:
    ap = _Parser(prog="latentr3 data", description="dataset tools")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare-amazon", help="raw Amazon 2018 reviews + metadata -> D3 folder")
    p.add_argument("--reviews", required=True, help="<Category>_5.json or .json.gz")
    p.add_argument("--meta", required=True, help="meta_<Category>.json or .json.gz")
    p.add_argument("--out", required=True, help="output D3 folder")
    p.add_argument("--category", default="", help="dataset name, e.g. CDs_and_Vinyl (prompt word)")
    p.add_argument("--min-items", type=int, default=5000, help="grow the window until this many items")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("inspect", help="sizes of a D3 folder (or a build-tfds output)")
    p.add_argument("dir")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count bad rows")

    p = sub.add_parser("build-tfds", help="D3 folder -> TFDS array_record dataset")
    p.add_argument("--src", required=True)
    p.add_argument("--data-dir", required=True, help="tfds data_dir to write into")
    p.add_argument("--name", default="", help="dataset name (default: the folder name)")
    p.add_argument("--skip-invalid", action="store_true")

    p = sub.add_parser("synthetic", help="write the synthetic dataset to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--num-items", type=int, default=320)
    p.add_argument("--num-users", type=int, default=700)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("baselines", help="most-popular / transition baselines, HR@K NDCG@K")
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--title-rule", action="store_true", help="same title counts as a hit")

    args = ap.parse_args(list(argv))
    tools = _lazy("latentr3_jax.data.tools")
    if args.cmd == "prepare-amazon":
        summary = _lazy("latentr3_jax.data.amazon").prepare_amazon(
            args.reviews, args.meta, args.out, category=args.category, min_items=args.min_items,
            verbose=not args.quiet)
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    elif args.cmd == "inspect":
        print(tools.describe(tools.open_dataset(args.dir, args.skip_invalid)))
    elif args.cmd == "build-tfds":
        out = _lazy("latentr3_jax.data.tfds_builder").build_tfds(
            args.src, args.data_dir, name=args.name or None, skip_invalid=args.skip_invalid)
        print(f"wrote {out}")
    elif args.cmd == "synthetic":
        folder = _lazy("latentr3_jax.data.synthetic").write_synthetic(
            args.out, args.num_items, args.num_users, args.seed)
        print(tools.describe(tools.open_dataset(folder)))
    elif args.cmd == "baselines":
        baselines = _lazy("latentr3_jax.data.baselines")
        res = baselines.evaluate_baselines(tools.open_dataset(args.dir), args.split,
                                           exclude_history=args.exclude_history,
                                           title_rule=args.title_rule)
        print(baselines.format_table(res))
    return 0


def cmd_memory(argv: Sequence[str]) -> int:
    """The memory estimate of a config's SFT and LR-GRPO steps per device."""
    memory = _lazy("latentr3_jax.parallel.memory")
    ap = _Parser(prog="latentr3 memory", add_help=False)
    ap.add_argument("--devices", type=int, default=0, help="device count (default: the mesh's)")
    ap.add_argument("--model", choices=sorted(memory.KNOWN_MODELS), default=None,
                    help="estimate with this model's shape instead of reading model.hf_path")
    known, rest = ap.parse_known_args(list(argv))
    cfg, _ = _config(rest, stage=None)
    model = memory.KNOWN_MODELS[known.model]() if known.model else memory.decoder_config_from_cfg(cfg)
    print(memory.format_table(memory.config_estimates(cfg, known.devices or None,
                                                      decoder_config=model)))
    return 0


# --------------------------------------------------------------------------- entry point


COMMANDS = {
    "run": (cmd_run, "whole pipeline: SFT baseline, SFT + LatentR³, LR-GRPO, evaluation table"),
    "study": (cmd_study, "the pipeline over several seeds: intervals, paired differences, SASRec"),
    "sft": (cmd_sft, "stage 1: supervised fine-tuning (with latent thoughts)"),
    "grpo": (cmd_grpo, "stage 2: LR-GRPO reinforcement learning of the latent"),
    "evaluate": (cmd_evaluate, "constrained beam search / grounding, HR@K, NDCG@K"),
    "recommend": (cmd_recommend, "recommendations for typed or JSONL histories from a trained run"),
    "serve": (cmd_serve, "HTTP JSON service: POST /recommend, GET /healthz"),
    "convert": (cmd_convert, "Hugging Face checkpoint or GGUF file <-> Orbax checkpoint"),
    "data": (cmd_data, "datasets: prepare-amazon, inspect, build-tfds, synthetic, baselines"),
    "memory": (cmd_memory, "per-device memory estimate of a config's training steps"),
}

USAGE = "usage: latentr3 <command> [options]   (latentr3 <command> --help for its options)"
HELP_FLAGS = ("-h", "--help")
VERSION_FLAGS = ("-V", "--version")

# The commands whose options are the config's, and the file each reads without --config
# (the `default` its cmd_* function passes to _config). `<command> --help` lists that
# config; tests/test_cli_help.py holds this equal to what the commands read.
CONFIG_FILES = {"run": "demo.py", "study": "demo.py", "sft": "default.py", "grpo": "default.py",
                "evaluate": "default.py", "memory": "default.py", "recommend": "default.py",
                "serve": "default.py"}
# Options of a config command besides the config's, and keys it cannot run without.
_RUN_OPTIONS = [("--run DIR", "run directory or Hugging Face export folder (required)"),
                ("--checkpoint W", "best (default) or latest"),
                ("--mode M", "constrained (trie beam search) or bigrec (grounding)")]
_OWN_OPTIONS = {
    "recommend": _RUN_OPTIONS + [
        ("--history TITLE", "an item title, oldest first; repeat for the whole history"),
        ("--input FILE", "JSONL: a list of titles or {history, k, id} per line"),
        ("--output FILE", "JSONL of recommendations; rerun to resume"),
        ("--k K", "recommendations per history (default 10, at most eval.num_beams)"),
        ("--overwrite", "start --output over when its settings differ"),
        ("--json", "with --history: print one JSON object")],
    "serve": _RUN_OPTIONS + [
        ("--host H", "address to listen on (default 127.0.0.1)"),
        ("--port P", "port (default 8080; 0 = any free port)"),
        ("--max-wait-ms MS", "how long a request waits for others to share its batch (5)")],
    "memory": [("--devices N", "device count to estimate for (default: the mesh's)"),
               ("--model NAME", "use a known model's shape (such as qwen2.5-1.5b), not model.*")],
}
_NEEDS = {"grpo": "--config.grpo.init_from=DIR (an SFT run with latent thoughts)",
          "evaluate": "--config.eval.checkpoint=DIR (the run to evaluate)",
          "recommend": "--run DIR; config flags are optional: when given they set eval.* and "
                       "model.dtype (as for evaluate), else the run's own settings apply",
          "serve": "--run DIR; config flags are optional: when given they set eval.* and "
                   "model.dtype (as for evaluate), else the run's own settings apply"}
_CONFIG_ARG = re.compile(r"^--?(?:no)?config[.=]")


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<10} {helptext}" for name, (_, helptext) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     this list; after a command, that command's options",
              "  -V, --version  the package version"]
    return "\n".join(lines)


def _version() -> str:
    """'latentr3 X (jax Y, flax Z)'; the dependency versions come from package metadata,
    so nothing heavy is imported."""
    # the package root is above this module in the layers (tests/test_layering.py) and is
    # loaded already, as this module's parent
    line = f"latentr3 {sys.modules['latentr3_jax'].__version__}"
    deps = []
    for dist in ("jax", "flax"):
        try:
            deps.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return line + (f" ({', '.join(deps)})" if deps else "")


def _show(value) -> str:
    """A config value as it would be written after --config.KEY=."""
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else repr(value)


def _command_help(name: str, argv: Sequence[str]) -> str:
    """Usage, the config file and overrides, and every config key with its value and
    meaning, for a command in CONFIG_FILES. The values are those of the config the command
    would read: its default file, or the --config and --config.KEY=VALUE arguments in argv."""
    args, spec = [], None
    i = 0
    while i < len(argv):   # keep the config's arguments, drop the command's own options
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            args += [a, argv[i + 1]]
            spec = argv[i + 1]
            i += 2
            continue
        if _CONFIG_ARG.match(a):
            args.append(a)
            if a.startswith("--config="):
                spec = a.split("=", 1)[1]
        i += 1
    default = CONFIG_FILES[name]
    cfg, _ = config_lib.parse_config(args, default_file=config_lib.default_config_file(default))
    own = _OWN_OPTIONS.get(name, [])
    usage = f"usage: latentr3 {name} " + "".join(f"[{flag}] " for flag, _ in own) + \
        "[--config FILE[:ARG]] [--config.KEY=VALUE ...]"
    lines = [usage, "", COMMANDS[name][1], ""]
    if name in _NEEDS:
        lines += [f"needs: {_NEEDS[name]}", ""]
    if own:
        lines += ["options:"] + [f"  {flag:<18} {text}" for flag, text in own] + [""]
    lines += [
        "--config FILE[:ARG]  a Python config file whose get_config(ARG) returns the config",
        f"                     (configs/*.py); default configs/{default}",
        "--config.KEY=VALUE   set one key, e.g. --config.sft.learning_rate=1e-4,",
        "                     --config.data.buckets=(64,128), --config.model.remat=True",
        "",
        f"config keys, with their values in {spec or 'configs/' + default}"
        + (" and the overrides given" if len(args) > (2 if spec else 0) else "") + ":",
    ]
    values = config_lib.flat_items(cfg)
    keys = [k for k in config_lib.DOCS if k in values] + sorted(set(values) - set(config_lib.DOCS))
    groups: dict = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0] if "." in key else "", []).append(key)
    width = min(max(len(f"{k} = {_show(values[k])}") for k in keys), 44)
    for section, members in groups.items():
        lines += ["", f"{section or 'top level'}: {config_lib.SECTION_DOCS.get(section, '')}"]
        for key in members:
            setting = f"{key} = {_show(values[key])}"
            lines.append(f"  {setting:<{width}}  {config_lib.DOCS.get(key, '')}".rstrip())
    return "\n".join(lines)


def _model_size_hint(name: str, argv: Sequence[str]) -> Optional[int]:
    """Parameters of the model a config command will train or load, read cheaply (no JAX,
    no weights) for the host allocator's `auto` policies (heap reuse, huge pages); None
    when it cannot tell. The SFT run's model_config.json for `grpo.init_from`, else what
    `latentr3 memory` sizes (memory.decoder_config_from_cfg: the from-scratch shape, a
    checkpoint's config.json or a GGUF file's metadata)."""
    if name not in CONFIG_FILES or os.environ.get("LATENTR3_CPU_MALLOC", "auto") not in (
            "auto", "system"):
        return None
    try:
        cfg, _ = config_lib.parse_config(
            list(argv), default_file=config_lib.default_config_file(CONFIG_FILES[name]))
        if name == "grpo" and cfg.grpo.init_from:
            with open(os.path.join(str(cfg.grpo.init_from), "model_config.json"),
                      encoding="utf-8") as f:
                facts = json.load(f)
            # lazy (start-up cost): only commands with a config read a model's size
            from latentr3_jax.model.config import DecoderConfig
            return int(DecoderConfig.from_dict(facts["decoder"]).num_params())
        from latentr3_jax.parallel import memory  # lazy (start-up cost)
        return int(memory.decoder_config_from_cfg(cfg).num_params())
    except Exception:   # noqa: BLE001  (a hint: the command itself reports bad input)
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    command_line = argv is None   # only a process of its own may restart itself
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and len(argv) > 1:
        argv = [argv[1], "--help"]      # `latentr3 help sft` = `latentr3 sft --help`
    if not argv or argv[0] in HELP_FLAGS + ("help",):
        print(_help())
        return 0
    if argv[0] in VERSION_FLAGS:
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"latentr3: unknown command {name!r}\n{_help()}", file=sys.stderr)
        return 2
    if name in CONFIG_FILES and any(a in HELP_FLAGS for a in rest):
        try:   # before JAX or anything heavy loads
            print(_command_help(name, rest))
        except InputError as e:
            print(f"latentr3 {name}: error: {e}", file=sys.stderr)
            return 2
        return 0
    cpu_alloc = _lazy("latentr3_jax.utils.cpu_alloc")
    try:
        size = _model_size_hint(name, rest)
        restart = (cpu_alloc.hugepage_env(size, idle=name == "serve") if command_line
                   else None)
        if restart is None:
            # before XLA starts its threads; `auto` reuses the heap for small models only
            cpu_alloc.configure(num_params=size)
    except ValueError as e:
        print(f"latentr3: error: {e}", file=sys.stderr)
        return 2
    if restart is not None:   # glibc reads its tunables at start-up only
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, list(sys.orig_argv), restart)
        except OSError as e:   # carry on as is
            print(f"latentr3: could not restart with huge pages ({e})", file=sys.stderr)
            cpu_alloc.configure(num_params=size)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.environ.get(cpu_alloc.RESTARTED_ENV):
        logging.getLogger(__name__).info(
            "host memory: glibc malloc with transparent huge pages (%s=off turns this off)",
            cpu_alloc.HUGEPAGES_ENV)
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax's per-save INFO lines
    try:
        return int(COMMANDS[name][0](rest) or 0)
    except InputError as e:
        print(f"latentr3 {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latentr3 {name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:   # argparse's --help (0) in convert and data
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        raise


if __name__ == "__main__":
    sys.exit(main())
