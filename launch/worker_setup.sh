#!/usr/bin/env bash
# Runs ON each TPU VM worker (launch/setup.sh calls it there): a venv with the pinned
# requirements and jax[tpu], and optionally a gcsfuse mount of a Cloud Storage bucket.
#
#   bash launch/worker_setup.sh [--bucket BUCKET] [--mount DIR]
#
# PYTHON (default python3.11; installed with apt when missing, as on the Ubuntu 22.04 TPU
# images whose python3 is 3.10).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3.11}"
BUCKET=""
MOUNT="gcs"
while (($#)); do
  case "$1" in
    --bucket) BUCKET="$2"; shift ;;
    --mount) MOUNT="$2"; shift ;;
    *) echo "worker_setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PYTHON" "$PYTHON-venv"
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
jax_version="$(sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements.txt)"
[[ -n "$jax_version" ]] || { echo "worker_setup.sh: no jax== pin in requirements.txt" >&2; exit 2; }
# jax[tpu] pulls the libtpu build that matches this jax release.
.venv/bin/python -m pip install -q -r requirements.txt "jax[tpu]==$jax_version"
.venv/bin/python -m pip check

if [[ -n "$BUCKET" ]]; then
  if ! command -v gcsfuse >/dev/null 2>&1; then
    codename="$(lsb_release -c -s)"
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
      | sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-$codename main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
  fi
  mkdir -p "$HOME/$MOUNT"
  mountpoint -q "$HOME/$MOUNT" || gcsfuse --implicit-dirs "$BUCKET" "$HOME/$MOUNT"
  echo "$(hostname): gs://$BUCKET mounted at $HOME/$MOUNT"
fi
echo "$(hostname): ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
