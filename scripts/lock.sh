#!/usr/bin/env bash
# Compile requirements/lock.txt (every dependency of peftlab[dev], exact versions and hashes) from pyproject.toml
# with pip-tools, for CPython 3.11 on Linux x86_64 (what scripts/setup.sh and CI install). torch is held at the
# CPU wheel 2.13.0: a newer torch from the registry is a multi-GB CUDA build.
#
#   bash scripts/lock.sh             # follow pyproject.toml: add/remove packages, keep every existing pin
#   bash scripts/lock.sh --upgrade   # move every pin to the newest release pyproject allows; refused unless
#                                    # `bash scripts/test.sh --latest` passed on exactly those versions
#   bash scripts/lock.sh --upgrade --force   # refresh without that check (say why in the commit message)
#
# See docs/dependencies.md for when to refresh the lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
upgrade="" force=""
for arg in "$@"; do
    case "$arg" in
        --upgrade) upgrade="--upgrade" ;;
        --force) force=1 ;;
        *) echo "lock.sh: unknown argument $arg (use --upgrade, --force)" >&2; exit 2 ;;
    esac
done
py="${PYTHON:-python3}"
tools="${PEFTLAB_LOCK_TOOLS:-$root/.venv-lock-tools}"
if [ ! -x "$tools/bin/pip-compile" ]; then
    echo "[lock] installing pip-tools into $tools"
    "$py" -m venv "$tools"
    "$tools/bin/python" -m pip install -q --upgrade pip pip-tools
fi
constraint="$(mktemp)"
out="$(mktemp)"
trap 'rm -f "$constraint" "$out"' EXIT
echo "torch==2.13.0" > "$constraint"
[ -f requirements/lock.txt ] && cp requirements/lock.txt "$out"
echo "[lock] resolving pyproject.toml [dev] ${upgrade:+(newest releases)}"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh  (add --upgrade to refresh: docs/dependencies.md)" "$tools/bin/pip-compile" --quiet $upgrade --extra dev --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
    --constraint "$constraint" \
    --output-file "$out" pyproject.toml 2> >(grep -v "^WARNING: Location" >&2)
# the temporary constraint file's path is recorded in 'via' comments: name what it stands for instead
sed -i "s|$constraint|torch pin in scripts/lock.sh|g; s|-c /tmp/[^ ]*|-c torch pin in scripts/lock.sh|g" "$out"
if [ -n "$upgrade" ] && [ -z "$force" ]; then
    passed=".venv-latest/peftlab-latest-passed.txt"
    if [ ! -f "$passed" ]; then
        echo "[lock] refused: no passing newest-releases run; run 'bash scripts/test.sh --latest' first" >&2
        exit 1
    fi
    untested="$("${PYTHON:-python3}" scripts/lockdiff.py "$out" "$passed")"
    if [ -n "$untested" ]; then
        echo "[lock] refused: these pins were not in the last passing 'scripts/test.sh --latest' run:" >&2
        echo "$untested" >&2
        echo "[lock] run 'bash scripts/test.sh --latest' again (new releases appeared), then this command" >&2
        exit 1
    fi
fi
mkdir -p requirements
cp "$out" requirements/lock.txt
echo "[lock] wrote requirements/lock.txt ($(grep -c '^[a-zA-Z0-9]' requirements/lock.txt) packages)"
