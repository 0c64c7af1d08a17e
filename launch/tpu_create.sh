#!/usr/bin/env bash
# Create a Cloud TPU VM, or a queued resource that waits for capacity and then creates it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu_create.sh --name NAME --zone ZONE --accelerator-type TYPE
                              [--runtime-version VER] [--queued] [--spot | --preemptible]

Creates the TPU VM (gcloud compute tpus tpu-vm create), or with --queued a queued
resource (gcloud compute tpus queued-resources create) and waits until it is ACTIVE."

parse_flags "${USAGE}" "$@"
tpu_create
