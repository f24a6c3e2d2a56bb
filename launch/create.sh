#!/usr/bin/env bash
# Create a Cloud TPU VM slice.
#
#   launch/create.sh [--dry-run] [--name N] [--zone Z] [--project P]
#                    [--accelerator-type T] [--version V] [--spot|--no-spot]
#
# Needs TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE and RUNTIME_VERSION (environment or flags;
# see launch/common.sh). SPOT=true asks for a Spot slice: cheaper, but it can be preempted at
# any time, so train with checkpoints (train.save_every) and restart with --resume.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
no_extra_args
require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION

extra=()
[[ "$SPOT" == true ]] && extra+=(--spot)
tpu_vm create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
