#!/usr/bin/env bash
# Sets up a fresh machine for carp_fast: Debian's Fashion-MNIST (the embedded data set)
# and a virtual environment in .venv with the package and its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import carp_fast, fastai, nvidia.dali, faiss, accelerate, psutil, lightly" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  # benchmarks/peers.py (SwAV and DINO beside CARP) and its test: lightly without the
  # Lightning stack it declares but its losses and heads never import (pyproject.toml, peers).
  .venv/bin/python -m pip install -q --no-deps lightly==1.6.0
fi
