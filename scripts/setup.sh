#!/usr/bin/env bash
# Create .venv and install speccascade into it.  Usage: scripts/setup.sh [extras]   (e.g. "test", "eval,gguf")
# Where no GPU is present, torch is pinned first to the CPU build that these machines have on disk
# (a bare torch requirement would pull a CUDA build of several GB); elsewhere pyproject's range applies.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-eval}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
