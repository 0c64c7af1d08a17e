#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its TPU VM.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu_delete.sh --name NAME --zone ZONE [--queued]

Deletes without asking (--quiet). Checkpoints in a gs:// workdir are kept."

parse_flags "${USAGE}" "$@"
tpu_delete
