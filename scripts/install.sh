#!/usr/bin/env bash
# Idempotent install into .venv (or $VENV). Safe to rerun: it only does work when
# pyproject.toml or constraints.txt changed since the last successful install.
#
# Versions come from constraints.txt (the tested set; pyproject.toml keeps the ranges).
# SPATIALRL_CONSTRAINTS=OTHER_FILE uses another file; SPATIALRL_CONSTRAINTS= (empty) installs
# the newest versions pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.spatialrl-installed"
CONSTRAINTS=${SPATIALRL_CONSTRAINTS-constraints.txt}
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] \
    && { [ -z "$CONSTRAINTS" ] || [ "$STAMP" -nt "$CONSTRAINTS" ]; }; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
CONSTRAIN=()
[ -z "$CONSTRAINTS" ] || CONSTRAIN=(-c "$CONSTRAINTS")
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # A bare `torch` requirement would pull the multi-GB CUDA build; CPU machines take the
  # CPU wheel. GPU machines and clusters keep (or install) their own CUDA build. torch is not
  # in constraints.txt; its own dependencies are.
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "${CONSTRAIN[@]}" torch
  else
    $PIP install "${CONSTRAIN[@]}" torch==2.13.0
  fi
fi
EXTRAS=${SPATIALRL_EXTRAS:-dev}
$PIP install "${CONSTRAIN[@]}" -e ".[${EXTRAS}]"
touch "$STAMP"
