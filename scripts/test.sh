#!/usr/bin/env bash
# README command 2: set up everything (the locked versions), then run the whole test suite. Extra arguments go
# to pytest (e.g. `scripts/test.sh -m slow` for the slow integration tests).
#
#   bash scripts/test.sh --latest [pytest args]   # the same suite on the newest releases pyproject.toml allows
#       (torch aside: it stays the CPU wheel), in a fresh venv .venv-latest; on success it records the versions
#       in .venv-latest/peftlab-latest-passed.txt, which `bash scripts/lock.sh --upgrade` requires.
#
# A throwaway PostgreSQL server (scripts/postgres.sh) runs for the duration of the tests, its URL in
# PEFTLAB_TEST_POSTGRES, for tests/integration/test_compare_postgres_runs.py (skipped with the printed reason where none can start).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start_postgres() {
    if [ -n "${PEFTLAB_TEST_POSTGRES:-}" ]; then return; fi  # a server of the caller's
    pgdir="$(mktemp -d /tmp/peftlab-postgres.XXXXXX)"
    trap 'bash "$root/scripts/postgres.sh" stop "$pgdir"' EXIT
    PEFTLAB_TEST_POSTGRES="$(bash "$root/scripts/postgres.sh" start "$pgdir")"
    export PEFTLAB_TEST_POSTGRES
    [ -n "$PEFTLAB_TEST_POSTGRES" ] && echo "[test] PostgreSQL for the tests: $PEFTLAB_TEST_POSTGRES"
    # none started: tests/integration/test_compare_postgres_runs.py is skipped, giving the reason printed above
    [ -n "$PEFTLAB_TEST_POSTGRES" ] || export PEFTLAB_TEST_POSTGRES=none
}
if [ "${1:-}" = "--latest" ]; then
    shift
    export PEFTLAB_VENV="${PEFTLAB_LATEST_VENV:-$root/.venv-latest}"
    export PEFTLAB_LOCK=none
    rm -rf "$PEFTLAB_VENV"  # fresh, so every dependency resolves to its newest release today
    bash "$root/scripts/setup.sh"
    freeze="$("$PEFTLAB_VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null)"
    echo "[latest] versions that differ from requirements/lock.txt:"
    "$PEFTLAB_VENV/bin/python" scripts/lockdiff.py requirements/lock.txt <(echo "$freeze") | sed 's/^/  lock: /'
    start_postgres
    "$PEFTLAB_VENV/bin/python" -m pytest "$@"
    echo "$freeze" > "$PEFTLAB_VENV/peftlab-latest-passed.txt"
    echo "[latest] passed; versions recorded in $PEFTLAB_VENV/peftlab-latest-passed.txt." \
         "Refresh the lock with: bash scripts/lock.sh --upgrade"
    exit 0
fi
bash "$root/scripts/setup.sh"
venv="${PEFTLAB_VENV:-$root/.venv}"
# lint first (seconds): unused names, shadowed loop variables and import order are caught before the long suite
"$venv/bin/ruff" check --quiet "$root" || { echo "[test] ruff found the problems above (ruff check --fix repairs the [*] ones)" >&2; exit 1; }
start_postgres
"$venv/bin/python" -m pytest "$@"  # (not exec: the EXIT trap stops the PostgreSQL server)
