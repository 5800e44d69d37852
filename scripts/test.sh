#!/usr/bin/env bash
# README command 2: set up everything, then run the whole test suite. Extra arguments go to pytest
# (e.g. `scripts/test.sh -m slow` for the slow integration tests).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${PEFTLAB_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
