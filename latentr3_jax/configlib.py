"""`--config FILE --config.key=value` parsing (ml_collections config_flags), per subcommand."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from latentr3_jax.errors import InputError

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def default_config_file(name: str = "default.py") -> str:
    return os.path.join(_REPO_CONFIGS, name)


def parse_config(argv: Sequence[str], default_file: Optional[str] = None,
                 extra_flags=None) -> tuple:
    """Parse `argv` (without the program name) into (ConfigDict, FlagValues).

    `extra_flags(fv)` may define more absl flags on the same FlagValues.
    Unknown keys and bad values raise InputError naming the key.
    """
    argv = ["latentr3"] + list(argv)
    default_file = default_file or default_config_file()
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = argv[:1] + ["--config", default_file] + argv[1:]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=argv,
                                    lock_config=True, help_string="config file (configs/*.py)")
    if extra_flags is not None:
        extra_flags(fv)
    try:
        fv(argv)
        cfg = fv.config
        if cfg is not None:
            cfg.to_dict()  # a config file that failed to load raises on first access
    except Exception as e:  # absl, config file import and override errors alike
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        msg = " ".join(lines[:1] + [ln for ln in lines[1:] if "Errno" in ln or "Error" in ln][:1])
        raise InputError(f"bad command line or config: {msg or type(e).__name__}") from None
    if cfg is None:
        raise InputError("no --config given")
    return cfg, fv


def to_json_dict(cfg: ml_collections.ConfigDict) -> dict:
    return cfg.to_dict()
