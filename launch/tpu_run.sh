#!/usr/bin/env bash
# Start one latentr3 command on every worker of a TPU VM at the same time.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu_run.sh --name NAME --zone ZONE [--run-name NAME] -- COMMAND...

Runs 'latentr3 COMMAND...' detached on all workers (--worker=all); each worker logs to
~/latentr3-jax/logs/RUN_NAME.log. On a multi-host slice jax.distributed discovers the
other workers by itself. Use a workdir every worker can reach (gs://bucket/...) so that
checkpoints survive the VM. Example:

  launch/tpu_run.sh --name r3 --zone us-central2-b -- \\
      run --config configs/paper.py:cds,tpu-v4-8 \\
      --config.model.hf_path=/models/Qwen2.5-1.5B --config.workdir=gs://bucket/runs/cds"

parse_flags "${USAGE}" "$@"
tpu_run
