#!/usr/bin/env bash
# README command 1: set up everything, then fine-tune LoRA on all-MiniLM-L6-v2 for Rotten Tomatoes
# sentiment and print the test accuracy. Extra arguments are passed to `peftlab fit`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${PEFTLAB_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/peftlab" fit --config configs/quickstart.yaml "$@"
