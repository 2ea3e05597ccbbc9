#!/usr/bin/env bash
# Create .venv (if needed) and install stepdistill with its test tools. Idempotent.
# torch 2.14.1 + torchvision 0.29.1 are pinned first so pip takes the releases that lie on this
# machine's disk (a newer torch would pull a multi-GB download); everything else comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import stepdistill, torch, torchvision, diffusers, cleanfid; print('stepdistill', stepdistill.__version__, 'torch', torch.__version__)"
