#!/usr/bin/env bash
# One-command set-up: PyTorch (CPU build unless a GPU is present), then latentkit with its
# test, serve and hint extras, into the Python that runs this script (use a virtualenv if you like).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # A GPU: PyPI's default Linux wheel is the CUDA build.
    "$PY" -m pip install "${LATENTKIT_TORCH:-torch>=2.10}"
  else
    # No GPU: pin a release whose CPU build is available here. Elsewhere, point
    # LATENTKIT_TORCH_INDEX at PyTorch's CPU wheel index to avoid the large CUDA wheel.
    extra=()
    [ -n "${LATENTKIT_TORCH_INDEX:-}" ] && extra=(--index-url "$LATENTKIT_TORCH_INDEX")
    "$PY" -m pip install "${extra[@]}" "${LATENTKIT_TORCH:-torch==2.13.0}"
  fi
fi
"$PY" -m pip install -e ".[test,serve,hint]"
