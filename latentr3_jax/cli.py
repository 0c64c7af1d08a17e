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
import importlib
import logging
import os
import shlex
import shutil
import signal
import sys
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
    code, cfg, s = _train("grpo", argv, _lazy("latentr3_jax.train.grpo").train_grpo)
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


def _read_converted(src: str) -> tuple:
    """(config, params, tokenizer dir or None) from a params checkpoint or a run directory."""
    params_io = _lazy("latentr3_jax.model.params_io")
    if os.path.isdir(os.path.join(src, params_io.PARAMS_DIR)):
        config, params = params_io.load_params(src)
        return config, params, None
    runs = _lazy("latentr3_jax.train.runs")
    if os.path.isdir(os.path.join(src, runs.CHECKPOINTS)):
        run = runs.load_run(src)
        tok = os.path.join(src, runs.TOKENIZER)
        return run.model_config, run.params, tok if os.path.isdir(tok) else None
    raise InputError(f"{src}: neither a params checkpoint ({params_io.PARAMS_DIR}/) nor a run "
                     "directory (checkpoints/)")


def cmd_convert(argv: Sequence[str]) -> int:
    p = _Parser(prog="latentr3 convert",
                description="Hugging Face checkpoint or GGUF file <-> Orbax params checkpoint.")
    p.add_argument("--hf", metavar="PATH", help="Hugging Face checkpoint directory to read")
    p.add_argument("--gguf", metavar="FILE", help="GGUF file (Llama / Qwen2) to write as a "
                                                   "Hugging Face directory (--out)")
    p.add_argument("--to-hf", action="store_true", help="write a Hugging Face directory instead")
    p.add_argument("--from", dest="src", metavar="DIR",
                   help="with --to-hf: params checkpoint (from `convert --hf`) or a run directory")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    hf = _lazy("latentr3_jax.hf")
    exists = os.path.exists(args.out) and os.listdir(args.out)
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
        config, params, tokenizer_dir = _read_converted(args.src)
        hf.save_pretrained(config, params, args.out)
        if tokenizer_dir:
            for name in os.listdir(tokenizer_dir):
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(args.out, name))
        print(f"wrote Hugging Face checkpoint {args.out} ({config.model_type}, "
              f"{config.num_params() / 1e6:.2f}M params)")
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
    "convert": (cmd_convert, "Hugging Face checkpoint or GGUF file <-> Orbax checkpoint"),
    "data": (cmd_data, "datasets: prepare-amazon, inspect, build-tfds, synthetic, baselines"),
    "memory": (cmd_memory, "per-device memory estimate of a config's training steps"),
}

USAGE = "usage: latentr3 <command> [options]   (latentr3 <command> --help for its options)"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<10} {helptext}" for name, (_, helptext) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"latentr3: unknown command {name!r}\n{_help()}", file=sys.stderr)
        return 2
    cpu_alloc = _lazy("latentr3_jax.utils.cpu_alloc")
    try:
        cpu_alloc.configure()  # before XLA starts its threads (see cpu_alloc)
    except ValueError as e:
        print(f"latentr3: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax's per-save INFO lines
    try:
        return int(COMMANDS[name][0](rest) or 0)
    except InputError as e:
        print(f"latentr3 {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latentr3 {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
