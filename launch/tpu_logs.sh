#!/usr/bin/env bash
# Stream a run's log from one worker (default 0) or all of them.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu_logs.sh --name NAME --zone ZONE [--run-name NAME] [--worker N|all]

Follows ~/latentr3-jax/logs/RUN_NAME.log over ssh (tail -F: keeps following across
restarts of the run); Ctrl-C stops watching, not the run."

parse_flags "${USAGE}" "$@"
tpu_logs
