#!/usr/bin/env bash
# TensorBoard of a run on worker 0 (process 0 writes the events), forwarded to this machine.
#
#   launch/tensorboard.sh [--dry-run] [--logdir DIR] [--port PORT]
#
# Starts `tensorboard --logdir DIR` on worker 0 (DIR as the worker shell reads it, relative to
# REMOTE_DIR; default runs; e.g. '$HOME/gcs/runs' for a gcsfuse run_dir) and
# keeps an ssh tunnel open: browse http://localhost:PORT (default 6006) until Ctrl-C.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
LOGDIR="${LOGDIR:-runs}"
PORT="${PORT:-6006}"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --logdir | --port)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --logdir) LOGDIR="$2" ;;
        --port) PORT="$2" ;;
      esac
      shift
      ;;
    *) die "unknown argument $1 (see $SCRIPT --help)" ;;
  esac
  shift
done
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port $PORT: expected a number"
require TPU_NAME ZONE PROJECT

tpu_vm ssh --worker=0 \
  --command="cd $(quote_words "$REMOTE_DIR") && .venv/bin/tensorboard --logdir $LOGDIR --host localhost --port $PORT" \
  -- -L "$PORT:localhost:$PORT"
