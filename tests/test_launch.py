"""launch/ scripts in dry-run mode: the exact gcloud / latentr3 command lines they print.

A fake `gcloud` on PATH records any call, so a script that ran a command instead of
printing it fails the test. Printed lines are parsed back with shlex (as a shell would),
and remote `--command` strings are parsed a second time, so quoting mistakes show up as
wrong argument lists.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
EXECUTABLE = [p for p in SCRIPTS if p.name != "common.sh" and p.suffix == ".sh"]
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

TRICKY = ["run", "--config", "configs/paper.py:cds,tpu-v4-8",
          "--config.data.category=toys and games", "--config.workdir=gs://b/it's here",
          "--config.seed=$HOME"]


@pytest.fixture
def env(tmp_path):
    """Environment with a recording fake gcloud first on PATH and no TPU_* defaults."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "gcloud_calls"
    fake = bindir / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {shlex.quote(str(calls))}\nexit 1\n')
    fake.chmod(0o755)
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("TPU_", "SLURM_", "DRY_RUN", "GIT_URL", "RUN_NAME"))}
    e["PATH"] = f"{bindir}{os.pathsep}{e['PATH']}"
    e["TMPDIR"] = str(tmp_path)
    yield e
    assert not calls.exists(), f"gcloud was executed in a dry run: {calls.read_text()}"


def launch(env, script, *args, ok=True):
    out = subprocess.run([BASH, str(LAUNCH / script), *args], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def commands(out) -> list:
    """The printed command lines as argument lists (comments and notes skipped)."""
    return [shlex.split(line) for line in out.stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def flag(argv, name):
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(vals) == 1, (name, argv)
    return vals[0]


def remote(argv) -> str:
    return flag(argv, "--command")


TPU = ["--name", "r3", "--zone", "us-central2-b"]


# --------------------------------------------------------------------------- static checks


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", "-x", *[p.name for p in SCRIPTS]], cwd=LAUNCH,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", EXECUTABLE, ids=lambda p: p.name)
def test_syntax_help_and_executable(script, env):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert subprocess.run([BASH, "-n", str(script)], timeout=30).returncode == 0
    out = launch(env, script.name, "--help")
    assert out.stdout.startswith("usage: launch/" + script.name)
    bad = launch(env, script.name, "--no-such-flag", ok=False)
    assert bad.returncode == 2 and "unknown flag" in bad.stderr


# --------------------------------------------------------------------------- TPU scripts


def test_create_tpu_vm(env):
    out = launch(env, "tpu_create.sh", *TPU, "--accelerator-type", "v4-8", "--spot",
                 "--project", "proj", "--dry-run")
    [argv] = commands(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "r3"]
    assert flag(argv, "--zone") == "us-central2-b" and flag(argv, "--project") == "proj"
    assert flag(argv, "--accelerator-type") == "v4-8"
    assert flag(argv, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in argv and "--preemptible" not in argv
    pre = commands(launch(env, "tpu_create.sh", *TPU, "--accelerator-type", "v4-8",
                          "--preemptible", "--runtime-version", "custom", "--dry-run"))[0]
    assert "--preemptible" in pre and flag(pre, "--version") == "custom"


def test_create_queued_resource_and_env_dry_run(env):
    env = dict(env, DRY_RUN="1", TPU_NAME="qr", TPU_ZONE="us-east5-a")
    out = launch(env, "tpu_create.sh", "--accelerator-type", "v5p-16", "--queued", "--spot")
    [argv] = commands(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "qr"]
    assert flag(argv, "--node-id") == "qr" and flag(argv, "--zone") == "us-east5-a"
    assert flag(argv, "--accelerator-type") == "v5p-16"
    assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5" and "--spot" in argv
    assert "wait until the state is ACTIVE" in out.stdout
    bad = launch(env, "tpu_create.sh", "--accelerator-type", "v5p-16", "--queued",
                 "--preemptible", ok=False)
    assert bad.returncode == 2 and "--spot" in bad.stderr
    missing = launch(dict(env, TPU_ZONE=""), "tpu_create.sh", "--accelerator-type", "v4-8", ok=False)
    assert missing.returncode == 2 and "TPU_ZONE" in missing.stderr


def test_runtime_versions_match_the_config_presets(env):
    spec = importlib.util.spec_from_file_location("presets_for_launch", ROOT / "configs" / "paper.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    tpus = {n: p for n, p in presets.MESH_PRESETS.items() if n.startswith("tpu-")}
    assert len(tpus) == 3
    for p in tpus.values():
        argv = commands(launch(env, "tpu_create.sh", *TPU, "--accelerator-type",
                               p["accelerator_type"], "--dry-run"))[0]
        assert flag(argv, "--version") == p["runtime_version"]


def test_install_from_this_checkout_on_all_workers(env):
    out = launch(env, "tpu_install.sh", *TPU, "--dry-run")
    archive, scp, ssh = commands(out)
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == tarball and scp[6] == "r3:latentr3-src.tar.gz" and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r3"]
    assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == "us-central2-b"
    cmd = remote(ssh)
    assert "tar -xzf latentr3-src.tar.gz" in cmd
    words = shlex.split(cmd)
    assert "jax[tpu]>=0.10.2,<0.11" in words and "-e" in words
    assert words[words.index("--python") + 1] == "3.11"


def test_install_from_git(env):
    out = launch(env, "tpu_install.sh", *TPU, "--git-url", "https://example.org/r.git",
                 "--git-ref", "v1.2", "--dry-run")
    [ssh] = commands(out)  # nothing copied from here
    assert flag(ssh, "--worker") == "all"
    cmd = remote(ssh)
    assert "git clone https://example.org/r.git latentr3-jax" in cmd
    assert "checkout v1.2" in cmd and "uv pip install" in cmd


def _run_words(ssh_argv):
    """The latentr3 argument list inside a remote run command, parsed like bash would."""
    words = shlex.split(remote(ssh_argv))
    start = next(i for i, w in enumerate(words) if w.endswith("/bin/latentr3"))
    return words[start + 1:words.index(">>", start)]


def test_run_on_all_workers_keeps_arguments_intact(env):
    out = launch(env, "tpu_run.sh", *TPU, "--run-name", "cds", "--dry-run", "--", *TRICKY)
    [ssh] = commands(out)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "r3"]
    assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == "us-central2-b"
    assert _run_words(ssh) == TRICKY
    assert "logs/cds.log" in remote(ssh) and "nohup" in remote(ssh)
    none = launch(env, "tpu_run.sh", *TPU, "--dry-run", ok=False)
    assert none.returncode == 2 and "no latentr3 command" in none.stderr
    bad = launch(env, "tpu_run.sh", *TPU, "--run-name", "a b", "--dry-run", "--", "sft", ok=False)
    assert bad.returncode == 2


def test_remote_run_command_really_runs(env, tmp_path):
    """Execute the printed remote command in a fake home: latentr3 gets the exact args."""
    home = tmp_path / "home"
    (home / "latentr3-jax").mkdir(parents=True)
    binary = home / "latentr3-venv" / "bin" / "latentr3"
    binary.parent.mkdir(parents=True)
    got = tmp_path / "args"
    binary.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(got))}\n')
    binary.chmod(0o755)
    [ssh] = commands(launch(env, "tpu_run.sh", *TPU, "--dry-run", "--", *TRICKY))
    subprocess.run([BASH, "-c", remote(ssh)], cwd=home, env=dict(env, HOME=str(home)),
                   check=True, timeout=30, capture_output=True)
    for _ in range(100):  # the job is detached
        if got.exists() and got.read_text().count("\n") == len(TRICKY):
            break
        subprocess.run(["sleep", "0.05"])
    assert got.read_text().splitlines() == TRICKY
    assert (home / "latentr3-jax" / "logs" / "latentr3.log").exists()


def test_logs(env):
    [one] = commands(launch(env, "tpu_logs.sh", *TPU, "--run-name", "cds", "--dry-run"))
    assert flag(one, "--worker") == "0"
    assert remote(one) == "tail -n +1 -F latentr3-jax/logs/cds.log"
    [every] = commands(launch(env, "tpu_logs.sh", *TPU, "--worker", "all", "--dry-run"))
    assert flag(every, "--worker") == "all"


def test_delete(env):
    [vm] = commands(launch(env, "tpu_delete.sh", *TPU, "--dry-run"))
    assert vm[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "r3"] and "--quiet" in vm
    [qr] = commands(launch(env, "tpu_delete.sh", *TPU, "--queued", "--dry-run"))
    assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "r3"]
    assert "--force" in qr and "--quiet" in qr


def _verbs(cmds):
    return [" ".join(c[:5]) if c[0] == "gcloud" else c[0] for c in cmds]


def test_resume_after_preemption_recreates_installs_and_reruns(env):
    base = [*TPU, "--accelerator-type", "v5litepod-8", "--queued", "--spot", "--dry-run"]
    out = launch(env, "tpu_resume.sh", *base, "--", *TRICKY)  # dry runs assume PREEMPTED
    cmds = commands(out)
    assert _verbs(cmds) == ["gcloud compute tpus queued-resources delete",
                            "gcloud compute tpus queued-resources create", "git",
                            "gcloud compute tpus tpu-vm scp", "gcloud compute tpus tpu-vm ssh",
                            "gcloud compute tpus tpu-vm ssh"]
    assert flag(cmds[1], "--accelerator-type") == "v5litepod-8" and "--spot" in cmds[1]
    assert flag(cmds[1], "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert all(flag(c, "--worker") == "all" for c in cmds[3:])
    assert _run_words(cmds[-1]) == TRICKY
    assert "queued-resources describe r3" in out.stderr  # the state query it would make


def test_resume_other_states(env):
    base = [*TPU, "--accelerator-type", "v4-8", "--dry-run"]
    healthy = launch(env, "tpu_resume.sh", *base, "--assume-state", "READY", "--", "sft")
    assert commands(healthy) == [] and "nothing to do" in healthy.stderr
    queued = launch(env, "tpu_resume.sh", *base, "--queued", "--assume-state",
                    "WAITING_FOR_RESOURCES", "--", "sft")
    assert _verbs(commands(queued)) == ["git", "gcloud compute tpus tpu-vm scp",
                                        "gcloud compute tpus tpu-vm ssh",
                                        "gcloud compute tpus tpu-vm ssh"]
    gone = launch(env, "tpu_resume.sh", *base, "--assume-state", "NOT_FOUND", "--", "sft")
    assert _verbs(commands(gone))[0] == "gcloud compute tpus tpu-vm create"
    none = launch(env, "tpu_resume.sh", *base, ok=False)
    assert none.returncode == 2 and "no latentr3 command" in none.stderr


# --------------------------------------------------------------------------- GPU


def test_gpu_multinode_from_slurm(env):
    slurm = dict(env, SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_PROCID="3",
                 SLURM_JOB_NODELIST="gpu-a,gpu-b,gpu-c,gpu-d", PATH=env["PATH"])
    out = launch(slurm, "gpu_multinode.sh", "--port", "2222", "--dry-run", "--", *TRICKY)
    [argv] = commands(out)
    if shutil.which("scontrol") is None:
        assert flag(argv, "--config.distributed.coordinator_address") == "gpu-a:2222"
    assert argv[0] == "latentr3" and argv[1:1 + len(TRICKY)] == TRICKY
    assert flag(argv, "--config.distributed.num_processes") == "4"
    assert flag(argv, "--config.distributed.process_id") == "3"


def test_gpu_multinode_from_flags(env):
    out = launch(dict(env, DRY_RUN="1"), "gpu_multinode.sh", "--coordinator", "10.0.0.1:9999",
                 "--num-processes", "2", "--process-id", "0", "--venv", "/opt/v", "--", "sft")
    [argv] = commands(out)
    assert argv[:2] == ["/opt/v/bin/latentr3", "sft"]
    assert flag(argv, "--config.distributed.coordinator_address") == "10.0.0.1:9999"
    for bad in (["--process-id", "2"], ["--process-id", "-1"], ["--coordinator", "nohost"]):
        args = ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"]
        i = args.index(bad[0])
        args[i + 1] = bad[1]
        res = launch(env, "gpu_multinode.sh", *args, "--dry-run", "--", "sft", ok=False)
        assert res.returncode == 2, bad
    missing = launch(env, "gpu_multinode.sh", "--dry-run", "--", "sft", ok=False)
    assert missing.returncode == 2 and "COORDINATOR" in missing.stderr


def test_unknown_accelerator_needs_a_runtime_version(env):
    res = launch(env, "tpu_create.sh", *TPU, "--accelerator-type", "v9-8", "--dry-run", ok=False)
    assert res.returncode == 2 and "--runtime-version" in res.stderr and res.stdout == ""


def _scripted_gcloud(tmp_path, states):
    """A gcloud that answers `describe` with the next of `states` and logs every call."""
    bindir = tmp_path / "scripted"
    bindir.mkdir()
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    log = tmp_path / "calls"
    script = f"""#!/usr/bin/env bash
echo "$*" >> {shlex.quote(str(log))}
if [[ " $* " == *" describe "* ]]; then
  head -n 1 {shlex.quote(str(tmp_path / 'states'))}
  sed -i 1d {shlex.quote(str(tmp_path / 'states'))}
fi
"""
    (bindir / "gcloud").write_text(script)
    (bindir / "gcloud").chmod(0o755)
    return bindir, log


def test_resume_for_real_with_a_scripted_gcloud(tmp_path):
    """Not a dry run: the state machine against a gcloud that reports a suspended queued
    resource, then waiting, then active."""
    bindir, log = _scripted_gcloud(tmp_path, ["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"])
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "DRY_RUN"))}
    e.update(PATH=f"{bindir}{os.pathsep}{e['PATH']}", TMPDIR=str(tmp_path), POLL_SECONDS="0")
    out = launch(e, "tpu_resume.sh", *TPU, "--accelerator-type", "v4-8", "--queued",
                 "--", "sft", "--config", "configs/paper.py:cds,tpu-v4-8")
    calls = log.read_text().splitlines()
    verbs = [" ".join(c.split()[:4]) for c in calls]
    assert verbs == ["compute tpus queued-resources describe",
                     "compute tpus queued-resources delete",
                     "compute tpus queued-resources create",
                     "compute tpus queued-resources describe",
                     "compute tpus queued-resources describe",
                     "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",
                     "compute tpus tpu-vm ssh"], calls
    assert (tmp_path / "latentr3-src.tar.gz").exists()  # this checkout, packed for the workers
    assert "latentr3 sft --config configs/paper.py:cds,tpu-v4-8" in calls[-1]
    assert "SUSPENDED; re-creating" in out.stderr
    # healthy: one query, nothing else
    again = tmp_path / "again"
    again.mkdir()
    bindir, log = _scripted_gcloud(again, ["READY"])
    e["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    launch(e, "tpu_resume.sh", *TPU, "--accelerator-type", "v4-8", "--", "sft")
    assert len(log.read_text().splitlines()) == 1
