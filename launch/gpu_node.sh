#!/usr/bin/env bash
# Multi-node GPU without a scheduler: run this on every node, each with its own NODE_RANK.
#
#   launch/gpu_node.sh [--dry-run] --coordinator HOST:PORT --num-nodes N --node-rank I \
#       -- python -m codescaler_jax.train_rm --config ... --set run_dir=/shared/runs/rm
#
# Settings: COORDINATOR_ADDRESS (node 0's address and a free port), NUM_NODES, NODE_RANK
# (0..N-1), from the environment or the flags. One JAX process per node uses all its GPUs; the
# script exports what codescaler_jax.distributed reads (JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES, JAX_PROCESS_ID) and runs the command. run_dir must be on a filesystem all
# nodes share. Under SLURM use launch/gpu_slurm.sbatch instead (JAX reads SLURM's variables).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NEEDS_GCLOUD=0
FLAG_OF+=([COORDINATOR_ADDRESS]=--coordinator [NUM_NODES]=--num-nodes [NODE_RANK]=--node-rank)
parse_common "$@"
COORDINATOR_ADDRESS="${COORDINATOR_ADDRESS:-}"
NUM_NODES="${NUM_NODES:-}"
NODE_RANK="${NODE_RANK:-}"
set -- "${ARGS[@]}"
while (($#)); do
  case "$1" in
    --coordinator | --num-nodes | --node-rank)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --coordinator) COORDINATOR_ADDRESS="$2" ;;
        --num-nodes) NUM_NODES="$2" ;;
        --node-rank) NODE_RANK="$2" ;;
      esac
      shift
      ;;
    *) die "unknown argument $1 (see $SCRIPT --help)" ;;
  esac
  shift
done
require COORDINATOR_ADDRESS NUM_NODES NODE_RANK
[[ "$COORDINATOR_ADDRESS" =~ ^[^:]+:[0-9]+$ ]] || die "COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS: expected HOST:PORT"
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES=$NUM_NODES: expected a positive number"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && ((NODE_RANK < NUM_NODES)) \
  || die "NODE_RANK=$NODE_RANK: expected 0..$((NUM_NODES - 1))"
((${#CMD[@]})) || die "no command: put it after -- (see $SCRIPT --help)"

run env JAX_COORDINATOR_ADDRESS="$COORDINATOR_ADDRESS" JAX_NUM_PROCESSES="$NUM_NODES" \
  JAX_PROCESS_ID="$NODE_RANK" "${CMD[@]}"
