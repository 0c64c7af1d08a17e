#!/usr/bin/env bash
# Bring a preempted TPU back and rerun the same command; training continues from the
# latest checkpoint in the run's workdir.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu_resume.sh --name NAME --zone ZONE --accelerator-type TYPE
                              [--queued] [--spot | --preemptible] [--git-url URL]
                              [--run-name NAME] [--watch SECONDS] -- COMMAND...

Checks the TPU's state. Preempted, stopped, suspended, failed or missing: delete what is
left, create it again (a queued resource waits for capacity), install, and start the same
COMMAND (as tpu_run.sh). Still queued: wait for it, then install and start. Healthy:
nothing to do. With --watch the check repeats every SECONDS until interrupted. Pass the
flags and COMMAND of the original launch; the workdir must be shared storage (gs://)."

# recover: one state check and, if needed, the whole way back to a running job.
recover() {
  local state
  state="$(tpu_state)"
  case "${state}" in
    READY | ACTIVE)
      note "${TPU_NAME} is ${state}; nothing to do"
      return 0 ;;
    ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING)
      note "${TPU_NAME} is ${state}; waiting for it"
      tpu_wait_ready ;;
    *)
      note "${TPU_NAME} is ${state}; re-creating it"
      if [[ "${state}" != NOT_FOUND ]]; then
        tpu_delete
      fi
      tpu_create ;;
  esac
  tpu_install
  tpu_run
}

parse_flags "${USAGE}" "$@"
require TPU_NAME TPU_ZONE ACCELERATOR_TYPE
remote_run_command > /dev/null  # fail early without a command
recover
if [[ "${WATCH_SECONDS}" -gt 0 && "${DRY_RUN}" != 1 ]]; then
  while sleep "${WATCH_SECONDS}"; do
    recover
  done
fi
