#!/usr/bin/env bash
# Show, follow or collect the logs of a job started with launch/run.sh, from every worker.
#
#   launch/logs.sh [--dry-run] [--job NAME] [--lines N]     last N lines (default 50) per worker
#   launch/logs.sh --follow [--job NAME]                    stream until Ctrl-C
#   launch/logs.sh --collect DIR [--job NAME]               one file per worker under DIR
#
# Lines are prefixed with the worker's hostname; the training logger adds the JAX process
# index ([p0], [p1], ...). Each process's own log file (log.p<i>.txt) is also in its run_dir.

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
JOB="${JOB:-train}"
MODE=tail
LINES_=50
DEST=""
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --job | --lines | --collect)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --job) JOB="$2" ;;
        --lines) LINES_="$2" ;;
        --collect) MODE=collect DEST="$2" ;;
      esac
      shift
      ;;
    --follow) MODE=follow ;;
    *) die "unknown argument $1 (see $SCRIPT --help)" ;;
  esac
  shift
done
[[ "$JOB" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job $JOB: use letters, digits, . _ -"
[[ "$LINES_" =~ ^[0-9]+$ ]] || die "--lines $LINES_: expected a number"
require TPU_NAME ZONE PROJECT

log="$(quote_words "$REMOTE_DIR")/logs/$JOB.\$(hostname).log"
prefix="sed -u \"s/^/[\$(hostname)] /\""
case "$MODE" in
  tail) tpu_vm ssh --worker=all --command="tail -n $LINES_ $log | $prefix" ;;
  follow) tpu_vm ssh --worker=all --command="tail -n +1 -F $log | $prefix" ;;
  collect)
    run mkdir -p "$DEST"
    # gcloud writes each worker's output to its own file in DEST.
    tpu_vm ssh --worker=all --command="cat $log" --output-directory="$DEST"
    ;;
esac
