#!/usr/bin/env bash
# Install the package on every worker of a TPU VM (--worker=all).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: launch/tpu_install.sh --name NAME --zone ZONE [--git-url URL [--git-ref REF]]
                               [--python VER]

On every worker: fetch the code (git clone of --git-url, or this checkout's HEAD copied
with git archive + scp), make a Python virtualenv with uv (~/latentr3-venv), and
pip-install the package editable with jax[tpu]. Prints each worker's process index and
device count at the end."

parse_flags "${USAGE}" "$@"
tpu_install
