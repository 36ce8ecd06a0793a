#!/usr/bin/env bash
# Loads the example service (Rust + pypool, 2 Python workers) and the same handlers under
# uvicorn (2 workers, uvloop, httptools) with wrk, back to back, and prints a table.
#
#   examples/service/load.sh                         # 30 s per run, 2 rounds: ~9 minutes
#   DURATION=10s REPEAT=3 examples/service/load.sh
#   SERVICE_ARGS="--threads 1" examples/service/load.sh
#
# Settings (DURATION, REPEAT, CONNECTIONS, WRK_THREADS, WORKERS, TRANSPORT, PREFETCH, ...) are
# described at the top of load.py. Needs wrk (`apt-get install wrk`) and python3 with venv.
#
# Caveat: wrk runs on the same machine as the servers and takes its share of the CPUs from
# whichever server it loads (one wrk thread by default, WRK_THREADS to change). Nothing is pinned;
# other work on the machine shifts the figures between runs, which is why every comparison is a
# pair of runs back to back and the table also gives CPU time per request.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v wrk >/dev/null || { echo "error: wrk not found (apt-get install wrk)" >&2; exit 1; }

echo "== building the service (release)" >&2
cargo build --release --quiet -p pypool-example-service
service="${CARGO_TARGET_DIR:-target}/release/pypool-example-service"

venv=target/pyenv-service
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv" >&2
    python3 -m venv "$venv"
fi
# The strongest usual way to run uvicorn: its C event loop and HTTP parser.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check uvicorn uvloop httptools

# load.py starts both servers, each in its own process group, and stops them (SIGTERM to the
# group, by pid) when it ends, fails or is interrupted (SIGINT, SIGTERM).
exec "$venv/bin/python" examples/service/load.py "$service" "$PWD/$venv/bin/python"
