#!/usr/bin/env bash
# Idempotent install into .venv (or $VENV). Safe to rerun: it only does work when
# pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.spatialrl-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # A bare `torch` requirement would pull the multi-GB CUDA build; CPU machines take the
  # CPU wheel. GPU machines and clusters keep (or install) their own CUDA build.
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install torch
  else
    $PIP install torch==2.13.0
  fi
fi
EXTRAS=${SPATIALRL_EXTRAS:-dev}
$PIP install -e ".[${EXTRAS}]"
touch "$STAMP"
