#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: the Python runtime's unit tests (with a bare
# python3, then in a private venv with the optional msgpack/pyzmq codecs), formatting, clippy,
# the whole Rust workspace (whose transport tests start real Python workers with the bare
# python3 on PATH), and the checks that keep the crates publishable and the library lean.
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

echo "== the runtime installs with pip install ./python"
# Into a throwaway venv, from a copy (pip builds in the source tree), never into the test venv:
# an installed runtime of the same version would stand in for the embedded one in the tests.
pip_check=$(mktemp -d)
trap 'rm -rf "$pip_check"' EXIT
cp -r python "$pip_check/src"
python3 -m venv "$pip_check/venv"
"$pip_check/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pip_check/src"
installed=$("$pip_check/venv/bin/python" -c 'import pypool_worker; print(pypool_worker.__version__)')
embedded=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' python/pypool_worker/__init__.py)
if [ "$installed" != "$embedded" ]; then
    echo "error: pip install ./python gave pypool_worker $installed, the source says $embedded" >&2
    exit 1
fi
echo "ok: pypool_worker $installed"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== a plain dependency on the library compiles none of the CLI's dependencies"
# What `pypool = "0.1"` (default features) builds: normal and build dependencies, every target.
lib_deps=$(cargo tree -p pypool -e normal,build --prefix none --target all)
if grep -E '^(clap|clap_builder|indicatif|tracing-subscriber|comfy-table|console) ' <<<"$lib_deps"; then
    echo "error: the pypool library's default features pull in the CLI's dependencies (above)" >&2
    exit 1
fi
echo "ok: $(sed 's/ (\*)//' <<<"$lib_deps" | sort -u | wc -l) crates, no clap"

echo "== cargo package: every crate, in dependency order, built from its packaged sources"
# Each crate is packaged and then compiled from the .crate file alone, against the packages of the
# crates it depends on (a local registry of this workspace's packages), exactly as from crates.io.
list=$(cargo package --workspace --list --allow-dirty 2>/dev/null)
if grep -E '(__pycache__|\.pyc$|(^|/)target/|\.egg-info)' <<<"$list"; then
    echo "error: build output in a package (above)" >&2
    exit 1
fi
# The packages of this workspace all keep their version while the sources change, but cargo
# treats a registry package of a given version as immutable: it reuses what an earlier run
# unpacked (under $CARGO_HOME/registry/src/-<hash>/) and compiled. Remove both for our crates
# first; the verification builds go to their own target directory, so that only our crates are
# rebuilt there, not the tests' builds.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
members=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(" ".join(p["name"] for p in json.load(sys.stdin)["packages"]))')
for dir in "$cargo_home"/registry/src/*/; do
    case "$(basename "$dir")" in index.crates.io-*) continue ;; esac
    for member in $members; do rm -rf "${dir:?}$member"-*; done
done
package_target=target/package-check
# shellcheck disable=SC2046
cargo clean --quiet --target-dir "$package_target" $(printf -- '-p %s ' $members)
cargo package --workspace --allow-dirty --quiet --target-dir "$package_target"

echo "== cargo test"
cargo test --workspace --all-features
