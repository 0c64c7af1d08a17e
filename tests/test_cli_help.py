"""`latentr3 --version` and `latentr3 <command> --help`: answered at once, without JAX."""

import subprocess
import sys

import pytest

from latentr3_jax import __version__, cli
from latentr3_jax import config as config_lib
from latentr3_jax.config import base_config, flat_items


def _setting(key, value) -> str:
    return f"  {key} = {value!r}"


def test_version(capsys):
    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"latentr3 {__version__}"), out
        assert len(out.strip().splitlines()) == 1


def test_top_level_help_names_the_options(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--version" in out and "--help" in out


def test_command_help_lists_every_key_with_its_default(capsys):
    assert cli.main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: latentr3 sft ")
    assert cli.COMMANDS["sft"][1] in out
    assert "--config FILE[:ARG]" in out and "--config.KEY=VALUE" in out
    assert "sft.learning_rate = 0.0003" in out
    assert "eval.num_beams = 10" in out
    lines = out.splitlines()
    for key, value in flat_items(base_config()).items():
        shown = f"{key} = {tuple(value)!r}" if isinstance(value, tuple) else f"{key} = {value!r}"
        line = next((ln for ln in lines if ln.startswith(f"  {key} = ")), None)
        assert line is not None, key
        assert line.startswith("  " + shown), line
        assert line.rstrip().endswith(config_lib.DOCS[key]), line
    # grouped: each section's keys under one header
    headers = [ln.split(":", 1)[0] for ln in lines if ln and not ln.startswith(" ")
               and ln.split(":", 1)[0] in set(config_lib.SECTION_DOCS) | {"top level"}]
    assert headers[0] == "top level" and len(headers) == len(set(headers)) == len(config_lib.SECTION_DOCS)


@pytest.mark.parametrize("name", sorted(cli.CONFIG_FILES))
def test_every_config_command_has_help(name, capsys):
    assert cli.main([name, "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: latentr3 {name} ")
    assert f"configs/{cli.CONFIG_FILES[name]}" in out
    assert "  model.num_thoughts = " in out


def test_help_shows_the_values_the_command_would_use(capsys):
    assert cli.main(["run", "--help"]) == 0   # run reads configs/demo.py
    out = capsys.readouterr().out
    assert "sft.learning_rate = 0.003 " in out and "model.hidden_size = 128 " in out
    assert cli.main(["sft", "--config.sft.learning_rate=1e-4", "--help",
                     "--config.data.buckets=(32,64)"]) == 0
    out = capsys.readouterr().out
    assert "sft.learning_rate = 0.0001 " in out and "data.buckets = (32, 64) " in out
    assert "and the overrides given" in out
    assert cli.main(["memory", "--devices", "8", "--model", "qwen2.5-1.5b", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--devices N" in out and "sft.batch_size = 128 " in out


def test_help_with_a_bad_config_is_one_line_exit_2(capsys):
    assert cli.main(["sft", "--config", "/nonexistent/config.py", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    assert cli.main(["sft", "--help", "--config.sft.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_help_command_is_the_command_help(capsys):
    assert cli.main(["help", "grpo"]) == 0
    via_help = capsys.readouterr().out
    assert cli.main(["grpo", "--help"]) == 0
    assert capsys.readouterr().out == via_help
    assert "grpo.init_from" in via_help.split("config keys")[0]   # what grpo needs


@pytest.mark.parametrize("argv", [["convert", "--help"], ["data", "--help"],
                                  ["data", "inspect", "-h"]])
def test_argparse_commands_help_exits_0(argv, capsys):
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith(f"usage: latentr3 {argv[0]}")


def test_config_files_are_what_the_commands_read(monkeypatch):
    """CONFIG_FILES (the help's defaults) names the file each command parses by default."""
    class Read(Exception):
        pass

    def parse_config(argv, default_file=None, extra_flags=None):
        raise Read(default_file)

    monkeypatch.setattr(config_lib, "parse_config", parse_config)
    # recommend and serve read a config only when config flags follow their own
    argv = {"recommend": ["--run", "x", "--config.seed=1"], "serve": ["--run", "x", "--config.seed=1"]}
    for name, filename in cli.CONFIG_FILES.items():
        with pytest.raises(Read) as got:
            cli.COMMANDS[name][0](argv.get(name, []))
        assert got.value.args[0] == config_lib.default_config_file(filename), name


def test_version_and_help_import_no_jax():
    code = ("import contextlib, io, sys\n"
            "from latentr3_jax import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['--version']) == 0\n"
            "    for name in cli.CONFIG_FILES:\n"
            "        assert cli.main([name, '--help']) == 0\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "latentr3_jax", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"latentr3 {__version__}")
