#!/usr/bin/env bash
# Run one command on every worker of the slice at once (one JAX process per worker).
#
#   launch/run.sh [--dry-run] [--job NAME] [--detach] [--env KEY=VALUE]... -- COMMAND...
#   launch/run.sh --stop [--job NAME]
#
# e.g.  launch/run.sh -- python -m codescaler_jax.train_rm \
#           --config configs/rm_codescaler_8b.yaml --set run_dir=$HOME/gcs/runs/rm_8b
#
# On every worker: cd REMOTE_DIR, activate .venv, export the --env settings, run COMMAND with
# its output appended to logs/NAME.<hostname>.log (NAME defaults to train). COMMAND's words are
# joined with spaces and run by bash on the worker, so what you quote for this shell ('$HOME',
# '&&') reaches the worker's shell. JAX finds the other workers by itself on a TPU VM
# (codescaler_jax.distributed, mode auto). By default the output of all workers streams here
# until the command ends on all of them; with --detach the command keeps running in the
# background (see launch/logs.sh) and --stop ends it (its whole process group, every worker).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
JOB="${JOB:-train}"
DETACH=0
STOP=0
ENVS=()
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --job)
      (($# >= 2)) || die "--job needs a value"
      JOB="$2"
      shift
      ;;
    --env)
      (($# >= 2)) || die "--env needs KEY=VALUE"
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $2: expected KEY=VALUE"
      ENVS+=("$2")
      shift
      ;;
    --detach) DETACH=1 ;;
    --stop) STOP=1 ;;
    *) die "unknown argument $1 (see $SCRIPT --help)" ;;
  esac
  shift
done
[[ "$JOB" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job $JOB: use letters, digits, . _ -"
require TPU_NAME ZONE PROJECT

remote_dir="$(quote_words "$REMOTE_DIR")"
log="logs/$JOB.\$(hostname).log"
pidfile="logs/$JOB.\$(hostname).pid"
if ((STOP)); then
  ((${#CMD[@]} == 0)) || die "--stop takes no command"
  tpu_vm ssh --worker=all \
    --command="cd $remote_dir && if [ -f $pidfile ]; then kill -- -\$(cat $pidfile) && rm -f $pidfile && echo \"\$(hostname): stopped $JOB\"; else echo \"\$(hostname): no $JOB running\"; fi"
  exit 0
fi
((${#CMD[@]})) || die "no command: put it after -- (see $SCRIPT --help)"

script="cd $remote_dir && mkdir -p logs && . .venv/bin/activate"
((${#ENVS[@]})) && script+=" && export $(quote_words "${ENVS[@]}")"
cmd="${CMD[*]}"
if ((DETACH)); then
  # setsid: its own process group, which --stop kills as a whole; nohup + no tty: survives
  # the ssh session.
  script+=" && { nohup setsid bash -c $(quote_words "$cmd") >> $log 2>&1 < /dev/null & echo \$! > $pidfile; }"
  script+=" && echo \"\$(hostname): started $JOB (pid \$(cat $pidfile)), log $REMOTE_DIR/$log\""
else
  script+=" && set -o pipefail && { $cmd ; } 2>&1 | tee -a $log"
fi
tpu_vm ssh --worker=all --command="$script"
