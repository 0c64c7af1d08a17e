"""`latentr3` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from latentr3_jax.errors import InputError

# subcommand -> (module:function taking argv, one-line help)
COMMANDS = {
    "run": ("latentr3_jax.pipeline:main",
            "whole pipeline: SFT baseline, SFT + LatentR³, LR-GRPO, evaluation table"),
    "sft": ("latentr3_jax.train.sft:main", "stage 1: supervised fine-tuning (with latent thoughts)"),
    "grpo": ("latentr3_jax.train.grpo:main", "stage 2: LR-GRPO reinforcement learning of the latent"),
    "evaluate": ("latentr3_jax.eval.evaluate:main", "constrained beam search / grounding, HR@K, NDCG@K"),
    "convert": ("latentr3_jax.hf:convert_main", "Hugging Face checkpoint <-> Orbax checkpoint"),
    "data": ("latentr3_jax.data.cli:main", "datasets: prepare-amazon, inspect, build-tfds"),
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
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    from latentr3_jax.utils import cpu_alloc
    try:
        cpu_alloc.configure()  # before XLA starts its threads (see cpu_alloc)
    except ValueError as e:
        print(f"latentr3: error: {e}", file=sys.stderr)
        return 2
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except InputError as e:
        print(f"latentr3 {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latentr3 {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
