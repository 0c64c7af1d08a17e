# shellcheck shell=bash
# Shared by every launch script: flag parsing, dry-run execution, the gcloud commands for
# Cloud TPU VMs and queued resources, and the remote install / run command lines.
#
# Every command goes through `run`: with --dry-run (or DRY_RUN=1) it is printed, one
# shell-quoted command per line, instead of executed. Remote command strings are built
# with the same quoting, so a printed line can be pasted back into a shell as is.

set -euo pipefail

# Defaults; most can also come from the environment.
DRY_RUN="${DRY_RUN:-0}"
TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED=0
SPOT=0
PREEMPTIBLE=0
GIT_URL="${GIT_URL:-}"
GIT_REF="${GIT_REF:-main}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
RUN_NAME="${RUN_NAME:-latentr3}"
WORKER="${WORKER:-0}"
WATCH_SECONDS=0
ASSUME_STATE=""
WAIT_TIMEOUT="${WAIT_TIMEOUT:-7200}"   # seconds to wait for a TPU to become ready
POLL_SECONDS="${POLL_SECONDS:-30}"
CMD_ARGS=()

# Where things live on every TPU worker (relative to the login user's home).
REMOTE_DIR="latentr3-jax"
REMOTE_VENV="latentr3-venv"

SCRIPT_NAME="$(basename "$0")"

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  exit 2
}

note() {
  echo "[${SCRIPT_NAME}] $*" >&2
}

# shq ARG: ARG as one shell word: bare when it is plain, else in single quotes.
shq() {
  local s="$1" q="'"
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//${q}/${q}\\${q}${q}}"
  fi
}

# quote ARGS...: the arguments as one shell-quoted command line.
quote() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(shq "${arg}")"
  done
  printf '%s\n' "${out}"
}

# run CMD ARGS...: execute, or print the shell-quoted command line in a dry run.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

COMMON_FLAGS_HELP="common flags:
  --name NAME               TPU VM / queued resource name (env TPU_NAME)
  --zone ZONE               e.g. us-central2-b (env TPU_ZONE)
  --project PROJECT         GCP project (env TPU_PROJECT; default: gcloud's)
  --accelerator-type TYPE   v4-8, v5litepod-8, v5p-16, ... (env ACCELERATOR_TYPE)
  --runtime-version VER     TPU software version (default: chosen from the type)
  --queued                  use a queued resource instead of a plain TPU VM
  --spot                    spot capacity (preemptible; queued or plain)
  --preemptible             legacy preemptible TPU VM (plain TPU VMs only)
  --git-url URL             install by cloning URL on every worker (default: copy this
                            checkout's HEAD with git archive + scp)
  --git-ref REF             branch, tag or commit for --git-url (default: main)
  --python VER              Python of the worker virtualenv (default: 3.11, via uv)
  --run-name NAME           log file name on the workers (default: latentr3)
  --worker N|all            worker(s) for logs (default: 0)
  --watch SECONDS           resume: check again every SECONDS until interrupted
  --assume-state STATE      resume: skip the state query (dry runs default to PREEMPTED)
  --dry-run                 print the commands instead of running them (or DRY_RUN=1)
  -h, --help                this help
  -- ARGS...                the latentr3 command line, e.g. -- sft --config configs/x.py"

# parse_flags USAGE "$@": the shared flag set; everything after `--` goes to CMD_ARGS.
# (Some globals it sets are read only by the scripts that source this file.)
# shellcheck disable=SC2034
parse_flags() {
  local usage="$1"
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) TPU_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) TPU_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --runtime-version) RUNTIME_VERSION="${2:?--runtime-version needs a value}"; shift 2 ;;
      --queued) QUEUED=1; shift ;;
      --spot) SPOT=1; shift ;;
      --preemptible) PREEMPTIBLE=1; shift ;;
      --git-url) GIT_URL="${2:?--git-url needs a value}"; shift 2 ;;
      --git-ref) GIT_REF="${2:?--git-ref needs a value}"; shift 2 ;;
      --python) PYTHON_VERSION="${2:?--python needs a value}"; shift 2 ;;
      --run-name) RUN_NAME="${2:?--run-name needs a value}"; shift 2 ;;
      --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
      --watch) WATCH_SECONDS="${2:?--watch needs a value}"; shift 2 ;;
      --assume-state) ASSUME_STATE="${2:?--assume-state needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) printf '%s\n\n%s\n' "${usage}" "${COMMON_FLAGS_HELP}"; exit 0 ;;
      --) shift; CMD_ARGS=("$@"); break ;;
      *) die "unknown flag '$1' (see --help)" ;;
    esac
  done
  if [[ ! "${RUN_NAME}" =~ ^[A-Za-z0-9._-]+$ ]]; then
    die "--run-name '${RUN_NAME}': use letters, digits, '.', '_' or '-'"
  fi
}

require() {
  local var
  for var in "$@"; do
    [[ -n "${!var}" ]] || die "missing ${var} (see --help)"
  done
}

# default_runtime TYPE: the TPU software version that goes with an accelerator type.
default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# gcloud_flags: the --zone / --project flags every gcloud TPU command takes.
gcloud_flags() {
  GCLOUD_FLAGS=("--zone=${TPU_ZONE}")
  if [[ -n "${TPU_PROJECT}" ]]; then
    GCLOUD_FLAGS+=("--project=${TPU_PROJECT}")
  fi
}

# ----------------------------------------------------------------------------- create

tpu_create() {
  require TPU_NAME TPU_ZONE ACCELERATOR_TYPE
  local runtime="${RUNTIME_VERSION}"
  if [[ -z "${runtime}" ]]; then
    runtime="$(default_runtime "${ACCELERATOR_TYPE}")"  # a failure here stops the script
  fi
  gcloud_flags
  if [[ "${QUEUED}" == 1 ]]; then
    [[ "${PREEMPTIBLE}" == 0 ]] || die "--preemptible is for plain TPU VMs; queued resources use --spot"
    local extra=()
    [[ "${SPOT}" == 0 ]] || extra+=(--spot)
    run gcloud compute tpus queued-resources create "${TPU_NAME}" "--node-id=${TPU_NAME}" \
      "${GCLOUD_FLAGS[@]}" "--accelerator-type=${ACCELERATOR_TYPE}" \
      "--runtime-version=${runtime}" "${extra[@]}"
    tpu_wait_ready
  else
    [[ "${SPOT}" == 0 || "${PREEMPTIBLE}" == 0 ]] || die "pass one of --spot and --preemptible"
    local extra=()
    [[ "${SPOT}" == 0 ]] || extra+=(--spot)
    [[ "${PREEMPTIBLE}" == 0 ]] || extra+=(--preemptible)
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
      "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${runtime}" "${extra[@]}"
  fi
}

# tpu_state: READY / PREEMPTED / ... for a TPU VM, ACTIVE / SUSPENDED / ... for a queued
# resource, NOT_FOUND when it does not exist.
tpu_state() {
  if [[ -n "${ASSUME_STATE}" ]]; then
    echo "${ASSUME_STATE}"
    return
  fi
  gcloud_flags
  local cmd
  if [[ "${QUEUED}" == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}"
      "--format=value(state.state)")
  else
    cmd=(gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}"
      "--format=value(state)")
  fi
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${cmd[@]}" >&2
    echo "PREEMPTED"
    return
  fi
  "${cmd[@]}" 2>/dev/null || echo "NOT_FOUND"
}

# tpu_wait_ready: poll until the VM is READY / the queued resource ACTIVE.
tpu_wait_ready() {
  local want="READY" waited=0 state
  [[ "${QUEUED}" == 1 ]] && want="ACTIVE"
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# wait until the state is ${want}"
    return
  fi
  while true; do
    state="$(tpu_state)"
    [[ "${state}" == "${want}" ]] && return 0
    case "${state}" in
      FAILED | SUSPENDED | NOT_FOUND) die "${TPU_NAME} is ${state}, not ${want}" ;;
    esac
    ((waited < WAIT_TIMEOUT)) || die "${TPU_NAME} not ${want} after ${WAIT_TIMEOUT}s (state ${state})"
    note "${TPU_NAME}: ${state}, waiting for ${want}"
    sleep "${POLL_SECONDS}"
    waited=$((waited + POLL_SECONDS))
  done
}

tpu_delete() {
  require TPU_NAME TPU_ZONE
  gcloud_flags
  if [[ "${QUEUED}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

# ----------------------------------------------------------------------------- ssh / scp

# tpu_ssh WORKER REMOTE_COMMAND
tpu_ssh() {
  gcloud_flags
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" "--worker=$1" "--command=$2"
}

# ----------------------------------------------------------------------------- install

# The worker setup: uv provides a Python >= 3.11 (TPU images ship 3.10), the package is
# installed editable so configs/ and launch/ sit next to it, and jax gets its TPU extra.
remote_install_command() {
  local fetch
  if [[ -n "${GIT_URL}" ]]; then
    fetch="if [ -d ${REMOTE_DIR}/.git ]; then git -C ${REMOTE_DIR} fetch --all --tags; else git clone $(quote "${GIT_URL}") ${REMOTE_DIR}; fi && git -C ${REMOTE_DIR} checkout $(quote "${GIT_REF}") && { git -C ${REMOTE_DIR} pull --ff-only || true; }"
  else
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf latentr3-src.tar.gz -C ${REMOTE_DIR}"
  fi
  echo "set -e; ${fetch} && (command -v uv >/dev/null || python3 -m pip install --user -q uv) && export PATH=\$HOME/.local/bin:\$PATH && uv venv -q --allow-existing --python $(quote "${PYTHON_VERSION}") ${REMOTE_VENV} && uv pip install -q --python ${REMOTE_VENV}/bin/python -e ${REMOTE_DIR} 'jax[tpu]>=0.10.2,<0.11' && ${REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
}

tpu_install() {
  require TPU_NAME TPU_ZONE
  gcloud_flags
  if [[ -z "${GIT_URL}" ]]; then
    local repo archive
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    archive="${TMPDIR:-/tmp}/latentr3-src.tar.gz"
    run git -C "${repo}" archive --format=tar.gz -o "${archive}" HEAD
    run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:latentr3-src.tar.gz" \
      "${GCLOUD_FLAGS[@]}" --worker=all
  fi
  local cmd
  cmd="$(remote_install_command)"
  tpu_ssh all "${cmd}"
}

# ----------------------------------------------------------------------------- run / logs

# Start CMD_ARGS on every worker at once, detached; output in REMOTE_DIR/logs/RUN_NAME.log.
# jax.distributed finds the other workers of the slice by itself on TPU.
remote_run_command() {
  [[ ${#CMD_ARGS[@]} -gt 0 ]] || die "no latentr3 command given (append: -- sft --config FILE ...)"
  local log="logs/${RUN_NAME}.log"
  echo "cd ${REMOTE_DIR} && mkdir -p logs && nohup setsid ../${REMOTE_VENV}/bin/latentr3 $(quote "${CMD_ARGS[@]}") >> ${log} 2>&1 < /dev/null & echo started on \$(hostname): ${REMOTE_DIR}/${log}"
}

tpu_run() {
  require TPU_NAME TPU_ZONE
  local cmd
  cmd="$(remote_run_command)"  # a failure here (no command) stops the script
  tpu_ssh all "${cmd}"
}

tpu_logs() {
  require TPU_NAME TPU_ZONE
  tpu_ssh "${WORKER}" "tail -n +1 -F ${REMOTE_DIR}/logs/${RUN_NAME}.log"
}
