#!/usr/bin/env bash
# Build the documentation site into site/: regenerate the configuration reference from the code, then
# `mkdocs build --strict` (fails on broken links and on pages missing from the navigation).
#   bash scripts/docs.sh            # build
#   bash scripts/docs.sh serve      # live preview on http://127.0.0.1:8000
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PEFTLAB_VENV:-.venv}"
[ -x "$VENV/bin/mkdocs" ] || bash scripts/setup.sh
"$VENV/bin/python" -m peftlab.docgen
if [ "${1:-build}" = "serve" ]; then
  exec "$VENV/bin/mkdocs" serve
fi
"$VENV/bin/mkdocs" build --strict
echo "docs: $(pwd)/site/index.html"
