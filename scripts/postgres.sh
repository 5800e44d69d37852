#!/usr/bin/env bash
# A throwaway local PostgreSQL server for the tests of `peftlab compare --storage postgresql://...`
# (tests/integration/test_compare_postgres_runs.py). scripts/test.sh starts one before pytest and stops it afterwards.
#
#   bash scripts/postgres.sh start DIR   # prints the server's URL (postgresql://peftlab@127.0.0.1:PORT/peftlab)
#   bash scripts/postgres.sh stop DIR    # stops it and deletes DIR
#
# The server binaries come from Debian's `postgresql` package (installed with apt-get when missing and we are
# root); where that is impossible, `start` prints "[postgres] skipped: <reason>" on stderr, prints no URL and
# exits 0, so the tests that need it are skipped with that reason. The server listens on 127.0.0.1 on a free
# port with trust authentication: for tests only, never for real data.
set -euo pipefail
cmd="${1:-}"
dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    echo "usage: bash scripts/postgres.sh start|stop DIR" >&2
    exit 2
fi
skip() { echo "[postgres] skipped: $*" >&2; exit 0; }

bindir() {  # the newest installed server's bin directory (Debian keeps them out of PATH)
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
    if command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v pg_ctl)"; fi
}

# as_owner CMD...: run a server command as the data directory's owner (the server refuses to run as root)
as_owner() {
    if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    bin="$(bindir)"
    if [ -z "$bin" ]; then
        if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
            skip "no PostgreSQL server installed and apt-get cannot install one here (needs root and Debian/Ubuntu)"
        fi
        echo "[postgres] installing Debian's postgresql package" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >&2 \
            || skip "apt-get install postgresql failed (no network?)"
        bin="$(bindir)"
        [ -n "$bin" ] || skip "postgresql installed but no pg_ctl found"
    fi
    if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
        skip "running as root and there is no 'postgres' user to run the server as"
    fi
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [ "$(id -u)" = "0" ] && chown postgres "$dir"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    as_owner "$bin/initdb" -D "$dir/data" -U peftlab --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || skip "initdb failed: $(tail -n 1 "$dir/initdb.log")"
    # unix socket in DIR (the system's /var/run/postgresql may not be writable); fsync off: a test database
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=100" start >/dev/null \
        || skip "the server did not start: $(tail -n 1 "$dir/server.log")"
    echo "$port" > "$dir/port"
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U peftlab peftlab >"$dir/createdb.log" 2>&1 \
        || skip "createdb failed: $(tail -n 1 "$dir/createdb.log")"
    echo "postgresql://peftlab@127.0.0.1:$port/peftlab"
    ;;
stop)
    bin="$(bindir)"
    if [ -n "$bin" ] && [ -d "$dir/data" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: bash scripts/postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
