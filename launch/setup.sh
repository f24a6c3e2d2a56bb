#!/usr/bin/env bash
# Put the project on every worker of the slice and install the pinned requirements for TPU.
#
#   launch/setup.sh [--dry-run] [--name N] [--zone Z] [--project P] [--remote-dir D]
#                   [--git-url URL [--git-ref REF]] [--bucket BUCKET [--mount DIR]]
#
# Default: copy this checkout (tracked and untracked-but-not-ignored files, as a tarball) to
# every worker. --git-url clones URL (at --git-ref, default main) on every worker instead.
# Then, on every worker at once, launch/worker_setup.sh makes a Python 3.11 venv in REMOTE_DIR
# and installs requirements.txt plus jax[tpu] at the pinned jax version. --bucket mounts a
# Cloud Storage bucket with gcsfuse at --mount (default ~/gcs) on every worker: multi-host
# runs need run_dir on a filesystem all workers share (checkpoints, the data cache).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
GIT_URL="${GIT_URL:-}"
GIT_REF="${GIT_REF:-main}"
BUCKET="${BUCKET:-}"
MOUNT="${MOUNT:-gcs}"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --git-url | --git-ref | --bucket | --mount)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --git-url) GIT_URL="$2" ;;
        --git-ref) GIT_REF="$2" ;;
        --bucket) BUCKET="$2" ;;
        --mount) MOUNT="$2" ;;
      esac
      shift
      ;;
    *) die "unknown argument $1 (see $SCRIPT --help)" ;;
  esac
  shift
done
require TPU_NAME ZONE PROJECT

remote_dir="$(quote_words "$REMOTE_DIR")"
if [[ -n "$GIT_URL" ]]; then
  # fetch + detached checkout of FETCH_HEAD works for a branch, a tag or a commit.
  fetch="(git -C $remote_dir rev-parse --git-dir >/dev/null 2>&1 || git clone --quiet $(quote_words "$GIT_URL") $remote_dir)"
  fetch+=" && git -C $remote_dir fetch --quiet origin $(quote_words "$GIT_REF")"
  fetch+=" && git -C $remote_dir checkout --quiet --detach FETCH_HEAD"
  tpu_vm ssh --worker=all --command="$fetch"
else
  tarball="${TMPDIR:-/tmp}/codescaler-jax-$$.tar.gz"
  ((DRY_RUN)) || trap 'rm -f "$tarball"' EXIT
  # Only files git tracks or would add (no venv, runs, caches); deleted ones are skipped.
  run bash -c "cd $(quote_words "$REPO_DIR") && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -czf $(quote_words "$tarball")"
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:codescaler-jax.tar.gz" \
    --worker=all --zone="$ZONE" --project="$PROJECT"
  tpu_vm ssh --worker=all \
    --command="mkdir -p $remote_dir && tar -xzf codescaler-jax.tar.gz -C $remote_dir && rm codescaler-jax.tar.gz"
fi

setup="bash $remote_dir/launch/worker_setup.sh"
[[ -n "$BUCKET" ]] && setup+=" $(quote_words --bucket "$BUCKET" --mount "$MOUNT")"
tpu_vm ssh --worker=all --command="$setup"
