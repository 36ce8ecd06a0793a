#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: the Python runtime's unit tests (with a bare
# python3, then in a private venv with the optional msgpack/pyzmq codecs), formatting, clippy,
# and the whole Rust workspace (whose transport tests start real Python workers with the bare
# python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv-test
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv for the optional Python dependencies"
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "msgpack>=1" "pyzmq>=25"
# The zmq transport's Rust tests run their workers (and "remote" workers) with this interpreter;
# they fail, rather than skip, when it lacks pyzmq.
export PYPOOL_TEST_PYTHON="$PWD/$venv/bin/python"

echo "== Python runtime tests, bare python3 (stdlib only)"
(cd python && python3 -m unittest discover -s tests)

echo "== Python runtime tests, with msgpack and pyzmq"
(cd python && "../$venv/bin/python" -m unittest discover -s tests)

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== cargo test"
cargo test --workspace --all-features
