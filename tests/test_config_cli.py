"""Config parsing and the CLI front door: bad input is one line and exit code 2."""

import string
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentr3_jax import cli
from latentr3_jax.config import base_config, parse_config
from latentr3_jax.errors import InputError


def test_defaults_and_overrides():
    cfg, _ = parse_config(["--config.model.num_thoughts=2", "--config.sft.learning_rate=1e-4",
                           "--config.data.buckets=(32,64)"])
    assert cfg.model.num_thoughts == 2
    assert cfg.sft.learning_rate == pytest.approx(1e-4)
    assert tuple(cfg.data.buckets) == (32, 64)
    assert cfg.grpo.sigma == base_config().grpo.sigma


@pytest.mark.parametrize("argv", [
    ["--config.model.no_such_key=1"],
    ["--config.model.num_thoughts=abc"],
    ["--config", "/nonexistent/config.py"],
    ["--bogus"],
])
def test_bad_overrides_raise_input_error(argv):
    with pytest.raises(InputError):
        parse_config(argv)


_keys = st.sampled_from(["model.num_thoughts", "sft.learning_rate", "data.cutoff", "model.dtype",
                         "grpo.sigma", "eval.num_beams", "nope", "model", "data.buckets",
                         "sft", "seed", "workdir", "model.nope.deeper"])
_values = st.text(alphabet=string.printable, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=_keys, value=_values)
def test_fuzz_overrides_end_in_config_or_input_error(key, value):
    try:
        cfg, _ = parse_config([f"--config.{key}={value}"])
    except InputError as e:
        assert "\n" not in str(e)


def test_cli_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "sft" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2


def test_console_script_bad_override_exit_2():
    proc = subprocess.run([sys.executable, "-m", "latentr3_jax", "sft", "--config.model.nope=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0], proc.stderr
