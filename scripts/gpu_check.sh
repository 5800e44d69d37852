#!/usr/bin/env bash
# The GPU check (docs/distributed.md): LoRA, QLoRA (paged 8-bit AdamW), prefix tuning and P-tuning v2 fit a few
# dozen bf16-mixed steps on a TinyLlama-1.1B-shaped backbone built from its config (no downloads), generate, QLoRA
# merges; LoRA fits under FSDP2 on one GPU; then peftlab's samples/s against a hand-written loop.
#
#   bash scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]
#
# WHEEL_DIR holds wheels of what the GPU machine lacks or has at other versions than requirements/lock.txt
# (bitsandbytes, jsonargparse, datasets, gguf, transformers, peft, lightning and the dependencies the machine lacks;
# make it here with: bash scripts/gpu_check.sh --download WHEEL_DIR [PYTHON_VERSION], default 3.12). They are
# installed with --no-index --no-deps over what the machine has (torch stays the machine's CUDA build); peftlab
# itself runs from this checkout. Results: OUT_DIR (default $OUT or gpu_check_out)/gpu_check.md and .json
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
locked() { grep -E "^$1==" "$root/requirements/lock.txt" | cut -d' ' -f1; }
if [ "${1:-}" = "--download" ]; then
    wheels="${2:?usage: gpu_check.sh --download WHEEL_DIR [PYTHON_VERSION]}"
    mkdir -p "$wheels"
    plats=()
    for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
             manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${3:-3.12}" --implementation cp \
        "${plats[@]}" -d "$wheels" $(for n in bitsandbytes jsonargparse docstring-parser typeshed-client datasets \
                                         dill multiprocess gguf transformers peft lightning; do locked "$n"; done)
    du -sh "$wheels"
    exit 0
fi
wheels="${1:?usage: bash scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]}"
out="${2:-${OUT:-$root/gpu_check_out}}"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$wheels"/*.whl 2>&1 | grep -v "^WARNING" || true
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -m pip list 2>/dev/null | grep -iE "^(torch|lightning|transformers|peft|bitsandbytes|jsonargparse|datasets|pyarrow|fsspec|setuptools) " || true
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$py" benchmarks/gpu_check.py --out "$out" "${@:3}"
