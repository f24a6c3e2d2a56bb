#!/usr/bin/env bash
# Delete the TPU VM slice (every worker and its local disk; a gcsfuse bucket is untouched).
#
#   launch/delete.sh [--dry-run] [--yes] [--name N] [--zone Z] [--project P]
#
# Without --yes gcloud asks for confirmation.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
extra=()
for a in "${ARGS[@]}"; do
  case "$a" in
    --yes | -y) extra+=(--quiet) ;;
    *) die "unknown argument $a (see $SCRIPT --help)" ;;
  esac
done
require TPU_NAME ZONE PROJECT
tpu_vm delete "${extra[@]}"
