#!/usr/bin/env bash
# One latentr3 process per GPU node, joined by jax.distributed. Under Slurm (srun with one
# task per node) the coordinator, process count and process id come from the job;
# elsewhere pass them as flags or NUM_PROCESSES / PROCESS_ID / COORDINATOR_ADDRESS.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/gpu_multinode.sh [--coordinator HOST:PORT] [--num-processes N]
                                 [--process-id I] [--port PORT] [--venv DIR] [--dry-run]
                                 -- COMMAND...

Runs 'latentr3 COMMAND... --config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I' on this node.
Every node runs the same line with its own process id; each process drives all GPUs of
its node and feeds its slice of the global batch. Under Slurm:

  srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh -- \\
      sft --config configs/paper.py:cds,gpu-h100x8 --config.mesh.data=2 \\
      --config.workdir=/shared/runs/cds

(mesh: the preset is one node's 1x8x1; with more nodes scale 'data' to the node count.)

flags:
  --coordinator HOST:PORT   process 0's address (Slurm: first node of the job, --port)
  --num-processes N         number of nodes / processes (Slurm: SLURM_NTASKS)
  --process-id I            this process, 0..N-1 (Slurm: SLURM_PROCID)
  --port PORT               coordinator port when derived from Slurm (default 12355)
  --venv DIR                run DIR/bin/latentr3 (default: latentr3 on PATH)
  --dry-run                 print the command instead of running it (or DRY_RUN=1)"

COORDINATOR="${COORDINATOR_ADDRESS:-}"
NUM_PROCESSES="${NUM_PROCESSES:-}"
PROCESS_ID="${PROCESS_ID:-}"
PORT="${COORDINATOR_PORT:-12355}"
VENV=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) COORDINATOR="${2:?--coordinator needs a value}"; shift 2 ;;
    --num-processes) NUM_PROCESSES="${2:?--num-processes needs a value}"; shift 2 ;;
    --process-id) PROCESS_ID="${2:?--process-id needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --venv) VENV="${2:?--venv needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) printf '%s\n' "${USAGE}"; exit 0 ;;
    --) shift; CMD_ARGS=("$@"); break ;;
    *) die "unknown flag '$1' (see --help)" ;;
  esac
done

[[ ${#CMD_ARGS[@]} -gt 0 ]] || die "no latentr3 command given (append: -- sft --config FILE ...)"

# Slurm fills in whatever was not given.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:-${SLURM_NNODES:-}}}"
  PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:-}}"
  if [[ -z "${COORDINATOR}" ]]; then
    nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    [[ -n "${nodelist}" ]] || die "Slurm job without SLURM_JOB_NODELIST; pass --coordinator"
    if command -v scontrol > /dev/null; then
      first="$(scontrol show hostnames "${nodelist}" | head -n 1)"
    else
      first="${nodelist%%,*}"
      [[ "${first}" != *"["* ]] || die "cannot expand '${nodelist}' without scontrol; pass --coordinator"
    fi
    COORDINATOR="${first}:${PORT}"
  fi
fi

require COORDINATOR NUM_PROCESSES PROCESS_ID
[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '${NUM_PROCESSES}'"
[[ "${PROCESS_ID}" =~ ^[0-9]+$ && "${PROCESS_ID}" -lt "${NUM_PROCESSES}" ]] ||
  die "--process-id must be in 0..$((NUM_PROCESSES - 1)), got '${PROCESS_ID}'"
[[ "${COORDINATOR}" == *:* ]] || die "--coordinator must be HOST:PORT, got '${COORDINATOR}'"

LATENTR3="latentr3"
[[ -z "${VENV}" ]] || LATENTR3="${VENV}/bin/latentr3"

note "process ${PROCESS_ID}/${NUM_PROCESSES}, coordinator ${COORDINATOR}"
run "${LATENTR3}" "${CMD_ARGS[@]}" \
  "--config.distributed.coordinator_address=${COORDINATOR}" \
  "--config.distributed.num_processes=${NUM_PROCESSES}" \
  "--config.distributed.process_id=${PROCESS_ID}"
