#!/usr/bin/env bash
# The GPU check (docs/distributed.md): LoRA, QLoRA (paged 8-bit AdamW), prefix tuning and P-tuning v2 fit a few
# dozen bf16-mixed steps on a TinyLlama-1.1B-shaped backbone built from its config (no downloads), generate, QLoRA
# merges; then peftlab's samples/s against a hand-written loop. About 5 minutes on one H100.
#
#   bash scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]
#
# WHEEL_DIR holds wheels of what the GPU machine lacks (bitsandbytes, jsonargparse and their dependencies; make it
# here with: bash scripts/gpu_check.sh --download WHEEL_DIR). They are installed with --no-index; peftlab itself
# is installed from this checkout without dependencies. Results: OUT_DIR (default $OUT or gpu_check_out)/gpu_check.md
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [ "${1:-}" = "--download" ]; then
    wheels="${2:?usage: gpu_check.sh --download WHEEL_DIR}"
    mkdir -p "$wheels"
    # peftlab's own dependencies that the GPU machine does not have; torch, lightning, transformers and peft are there
    "$py" -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$wheels" --no-deps \
        "$(grep -E '^bitsandbytes==' "$root/requirements/lock.txt" | cut -d' ' -f1)" \
        "$(grep -E '^jsonargparse==' "$root/requirements/lock.txt" | cut -d' ' -f1)" \
        "$(grep -E '^docstring-parser==' "$root/requirements/lock.txt" | cut -d' ' -f1)" \
        "$(grep -E '^typeshed-client==' "$root/requirements/lock.txt" | cut -d' ' -f1)" \
        "$(grep -E '^datasets==' "$root/requirements/lock.txt" | cut -d' ' -f1)" \
        "$(grep -E '^gguf==' "$root/requirements/lock.txt" | cut -d' ' -f1)"
    du -sh "$wheels"
    exit 0
fi
wheels="${1:?usage: bash scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]}"
out="${2:-${OUT:-$root/gpu_check_out}}"
"$py" -m pip install -q --no-index --find-links "$wheels" bitsandbytes jsonargparse docstring-parser typeshed-client \
    datasets gguf 2>&1 | grep -v "^WARNING" || true
"$py" -m pip install -q --no-deps --no-build-isolation -e "$root" 2>/dev/null || "$py" -m pip install -q --no-deps -e "$root"
cd "$root"
exec timeout 480 "$py" benchmarks/gpu_check.py --out "$out"
