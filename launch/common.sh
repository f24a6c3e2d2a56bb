# Settings and helpers shared by the Cloud TPU VM launch scripts (sourced, not run).
#
# Every setting comes from an environment variable or the matching flag (the flag wins):
#
#   TPU_NAME          --name NAME               the TPU VM (slice) name
#   ZONE              --zone ZONE               e.g. us-central2-b, us-east5-a
#   PROJECT           --project PROJECT         the Google Cloud project id
#   ACCELERATOR_TYPE  --accelerator-type TYPE   e.g. v4-32, v5litepod-16, v6e-64 (create only)
#   RUNTIME_VERSION   --version VERSION         e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite,
#                                               v2-alpha-tpuv6e (create only)
#   SPOT              --spot / --no-spot        true: a Spot slice (cheaper, preemptible)
#   REMOTE_DIR        --remote-dir DIR          project directory on every worker, relative
#                                               to the remote home (default codescaler-jax)
#   GCLOUD                                      the gcloud binary (default: gcloud on PATH)
#
# --dry-run prints every command (one per line, shell-quoted) instead of running it.

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$LAUNCH_DIR/.." && pwd)"
SCRIPT="launch/$(basename "$0")"

GCLOUD="${GCLOUD:-gcloud}"
TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-false}"
REMOTE_DIR="${REMOTE_DIR:-codescaler-jax}"
DRY_RUN=0
NEEDS_GCLOUD=1  # gpu_node.sh runs no gcloud

die() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

declare -A FLAG_OF=(
  [TPU_NAME]=--name [ZONE]=--zone [PROJECT]=--project
  [ACCELERATOR_TYPE]=--accelerator-type [RUNTIME_VERSION]=--version
)

# parse_common "$@": takes the shared flags; leaves the script's own flags in ARGS and
# everything after a literal `--` in CMD.
parse_common() {
  ARGS=()
  CMD=()
  while (($#)); do
    case "$1" in
      -h | --help) show_help ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=true ;;
      --no-spot) SPOT=false ;;
      --name | --zone | --project | --accelerator-type | --version | --remote-dir)
        (($# >= 2)) || die "$1 needs a value"
        case "$1" in
          --name) TPU_NAME="$2" ;;
          --zone) ZONE="$2" ;;
          --project) PROJECT="$2" ;;
          --accelerator-type) ACCELERATOR_TYPE="$2" ;;
          --version) RUNTIME_VERSION="$2" ;;
          --remote-dir) REMOTE_DIR="$2" ;;
        esac
        shift
        ;;
      --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --remote-dir=*)
        local key="${1%%=*}" value="${1#*=}"
        set -- "$key" "$value" "${@:2}"
        continue
        ;;
      --)
        shift
        CMD=("$@")
        break
        ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  case "${SPOT,,}" in
    true | 1 | yes) SPOT=true ;;
    false | 0 | no | "") SPOT=false ;;
    *) die "SPOT=$SPOT: use true or false" ;;
  esac
}

# require VAR...: stop, naming every missing setting, before any command runs.
require() {
  local missing=() v
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || missing+=("$v")
  done
  if ((${#missing[@]})); then
    for v in "${missing[@]}"; do
      echo "$SCRIPT: missing setting $v (export $v=... or pass ${FLAG_OF[$v]:-the flag})" >&2
    done
    exit 2
  fi
  if ((!DRY_RUN && NEEDS_GCLOUD)) && ! command -v "$GCLOUD" >/dev/null 2>&1; then
    die "'$GCLOUD' not found on PATH (install the Google Cloud CLI, or use --dry-run)"
  fi
}

# shell_word WORD: WORD as the shell reads it back; plain words stay bare, others are
# single-quoted (a --flag=value keeps its flag bare) so that printed commands stay readable.
shell_word() {
  local w="$1" prefix=""
  if [[ "$w" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    w="${BASH_REMATCH[2]}"
  fi
  if [[ -n "$w" && "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$w"
  else
    printf "%s'%s'" "$prefix" "${w//\'/\'\\\'\'}"
  fi
}

# quote_words WORD...: one line that a shell splits back into exactly these words.
quote_words() {
  local out="" w
  for w in "$@"; do
    out+="$(shell_word "$w") "
  done
  printf '%s\n' "${out% }"
}

# run CMD...: run it, or with --dry-run print it (shell-quoted, one line).
run() {
  if ((DRY_RUN)); then
    quote_words "$@"
  else
    "$@"
  fi
}

# tpu_vm SUBCOMMAND [ARGS...]: `gcloud compute tpus tpu-vm SUBCOMMAND TPU_NAME --zone --project`.
tpu_vm() {
  local sub="$1"
  shift
  run "$GCLOUD" compute tpus tpu-vm "$sub" "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" "$@"
}

no_extra_args() {
  ((${#ARGS[@]} == 0)) || die "unknown argument ${ARGS[0]} (see $SCRIPT --help)"
}

show_help() {
  # The header comment of the calling script is its help text.
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit 0
}
