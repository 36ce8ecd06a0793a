#!/usr/bin/env bash
# The table of issue 11 ("Throughput and latency"), measured in one run with ratios.
#
#   scripts/bench-issue11.sh            # prints a Markdown report; raw JSON in target/bench-issue11/
#
# Builds the release binaries once, then runs, one after the other:
#   1. throughput: `pypool bench --baseline` (stdio, 2 workers, 64 callers, no-op handler,
#      `call` with the pool's default prefetch) against multiprocessing.Pool.imap_unordered with
#      chunksize 1 and with Pool.map's automatic chunksize (and the other baselines);
#   1b. map: `pypool bench --mode map-unordered` (`Pool::map_unordered`, automatic chunksize)
#      against imap_unordered with its automatic chunksize and ProcessPoolExecutor.map, on
#      MAP_ITEMS items; again with MSGPACK_PYTHON (an interpreter that has msgpack) if set;
#   2. latency, 1 worker, 1 caller, stdio, the whole process tree pinned to CPU 0 (taskset),
#      against a raw Rust->Python length-prefixed pipe echo;
#   3. the same unpinned;
#   4. the same over ipc, unpinned, against a raw Unix-socket echo (and pinned, for reference);
#   5. start-up: 32 workers ready against 32 bare interpreters answering one ping.
# Every figure is the median of several runs with its range, and every ratio is taken within
# one run (the machines are shared and noisy: compare ratios, not absolute numbers).
#
# Environment: PYTHON (the workers' interpreter; default python3), CALLS (calls per throughput
# run; 100000), REPEAT (runs of each figure; 3), ROUND_TRIPS (per latency repeat; 10000),
# STARTUP_RUNS (5), MAP_ITEMS (items per map run; 1000000), MSGPACK_PYTHON (unset), OUT
# (directory for the JSON; target/bench-issue11/<time>).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CALLS=${CALLS:-100000}
REPEAT=${REPEAT:-3}
ROUND_TRIPS=${ROUND_TRIPS:-10000}
STARTUP_RUNS=${STARTUP_RUNS:-5}
MAP_ITEMS=${MAP_ITEMS:-1000000}
MSGPACK_PYTHON=${MSGPACK_PYTHON:-}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-target/bench-issue11/$STAMP}
mkdir -p "$OUT"

say() { printf '%s\n' "$*" >&2; }

say "building (release) ..."
cargo build --release --quiet -p pypool-cli --bin pypool
cargo build --release --quiet -p transport-stdio --example stdio_bench
cargo build --release --quiet -p transport-ipc --example ipc_bench
BIN=target/release
command -v taskset >/dev/null || { say "taskset is needed (util-linux)"; exit 1; }

{
    echo "date_utc=$STAMP"
    echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
    echo "kernel=$(uname -sr)"
    echo "cpus=$(nproc)"
    echo "python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
    # The header codec its workers get (PROTOCOL.md, section 2): msgpack if it has it, else marshal.
    echo "python_codec=$("$PYTHON" -c 'import msgpack' 2>/dev/null && echo msgpack || echo marshal)"
    echo "rustc=$(rustc --version)"
    echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/env.txt"

say "1/5 throughput: pypool bench --baseline (stdio, 2 workers, 64 callers, $CALLS no-op calls, $REPEAT rounds) ..."
"$BIN/pypool" --python "$PYTHON" bench --baseline --json --transport stdio --workers 2 \
    --concurrency 64 --calls "$CALLS" --payload 0 --repeat "$REPEAT" >"$OUT/throughput.json"

say "1b/5 map: pypool bench --mode map-unordered --baseline ($MAP_ITEMS items, $REPEAT rounds) ..."
map_run() {
    "$BIN/pypool" --python "$1" bench --baseline --json --transport stdio --workers 2 \
        --mode map-unordered --calls "$MAP_ITEMS" --payload 0 --repeat "$REPEAT" \
        --only-baselines imap_unordered_auto_chunksize,executor_map
}
map_run "$PYTHON" >"$OUT/map.json"
if [ -n "$MSGPACK_PYTHON" ]; then
    "$MSGPACK_PYTHON" -c 'import msgpack' || { say "MSGPACK_PYTHON has no msgpack"; exit 1; }
    map_run "$MSGPACK_PYTHON" >"$OUT/map_msgpack.json"
fi

say "2/5 latency, stdio, pinned to CPU 0 ..."
PYPOOL_PYTHON=$PYTHON taskset -c 0 "$BIN/examples/stdio_bench" --only latency --json \
    --repeat "$REPEAT" --round-trips "$ROUND_TRIPS" >"$OUT/stdio_pinned.json"

say "3/5 latency, stdio, unpinned ..."
PYPOOL_PYTHON=$PYTHON "$BIN/examples/stdio_bench" --only latency --json \
    --repeat "$REPEAT" --round-trips "$ROUND_TRIPS" >"$OUT/stdio_unpinned.json"

say "4/5 latency, ipc, unpinned, then pinned to CPU 0 ..."
PYPOOL_PYTHON=$PYTHON "$BIN/examples/ipc_bench" --only latency --json \
    --repeat "$REPEAT" --round-trips "$ROUND_TRIPS" >"$OUT/ipc_unpinned.json"
PYPOOL_PYTHON=$PYTHON taskset -c 0 "$BIN/examples/ipc_bench" --only latency --json \
    --repeat "$REPEAT" --round-trips "$ROUND_TRIPS" >"$OUT/ipc_pinned.json"

say "5/5 start-up: 32 workers against 32 bare interpreters ($STARTUP_RUNS runs each) ..."
PYPOOL_PYTHON=$PYTHON "$BIN/examples/stdio_bench" --only startup --json \
    --startup-runs "$STARTUP_RUNS" --startup-workers 32 >"$OUT/startup.json"

echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/report.md"
import json, sys, pathlib

out = pathlib.Path(sys.argv[1])
load = lambda name: json.loads((out / name).read_text())
env = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines() if "=" in line)
tp = load("throughput.json")
pinned = load("stdio_pinned.json")
unpinned = load("stdio_unpinned.json")
ipc = load("ipc_unpinned.json")
ipc_pinned = load("ipc_pinned.json")
startup = load("startup.json")["startup"]
maps = [(load("map.json"), env["python_codec"])]
if (out / "map_msgpack.json").exists():
    maps.append((load("map_msgpack.json"), "msgpack"))
base = tp["baselines"]


def num(x, digits=1):
    return f"{x:,.{digits}f}"


def rate(x):
    return f"{x / 1000:,.1f} k/s"


def spread_rate(summary):
    lo, hi = summary["spread"]["throughput_per_s"]
    return f"{rate(summary['throughput_per_s'])} ({lo / 1000:,.1f}–{hi / 1000:,.1f})"


def words(speedup):
    """A speed-up (above 1 = pypool faster) in words, with its range in the same direction."""
    m, lo, hi = speedup["median"], speedup["min"], speedup["max"]
    if m >= 1:
        return f"{m:.2f}x faster [{lo:.2f}–{hi:.2f}]"
    return f"{1 / m:.2f}x slower [{1 / hi:.2f}–{1 / lo:.2f}]"


def slower(ratio):
    """pypool / floor (above 1 = pypool slower), as a speed-up in words."""
    inv = {"median": 1 / ratio["median"], "min": 1 / ratio["max"], "max": 1 / ratio["min"]}
    return words(inv)


def fig(f, unit="µs", digits=1):
    return f"{num(f['median'], digits)} {unit} ({num(f['min'], digits)}–{num(f['max'], digits)})"


def verdict(ok):
    return "**met**" if ok else "**missed**"


cs1 = base["imap_unordered_chunksize_1"]
auto = base["imap_unordered_auto_chunksize"]
s_cs1 = cs1["pypool_speedup"]["throughput"]
s_auto = auto["pypool_speedup"]["throughput"]
lat = lambda r, k: r["latency"]["latency_us"][k]
# The floor of each repeat is the faster of its two raw echoes (blocking std I/O, tokio).
over = lambda r: r["latency"]["pypool_mean_over"]["floor"]
floor = lambda r: r["latency"]["latency_us"]["floor"]["mean"]
p_ratio, u_ratio, i_ratio, ip_ratio = over(pinned), over(unpinned), over(ipc), over(ipc_pinned)
s_ratio = startup["pypool_over_bare"]

print(f"Run {env['date_utc']}, commit {env['commit']}, {env['kernel']}, {env['cpus']} CPUs, "
      f"Python {env['python']}, {env['rustc']}; load average before {env['load_before']}, "
      f"after {env.get('load_after', '?')}.")
print()
print("Figures: median over the runs (min–max). Ratios are taken within each run, then summarised "
      "the same way; \"x faster\"/\"x slower\" is pypool relative to the reference.")
print()
print("| workload | pypool | reference | pypool is | goal | |")
print("|---|---|---|---|---|---|")
print(f"| {tp['workers']} workers, {tp['concurrency']} callers, no-op, throughput: `call` with "
      f"prefetch {tp['prefetch']} ({tp['transport']}) | {spread_rate(tp)} | "
      f"`Pool.imap_unordered(f, range(n), chunksize=1)`, 2 processes: {spread_rate(cs1)} | "
      f"{words(s_cs1)} | >= 2x faster | {verdict(s_cs1['median'] >= 2)} |")
print(f"| same, against imap_unordered's automatic chunksize | {spread_rate(tp)} | "
      f"`imap_unordered(..., chunksize={auto['chunksize']})` (what `Pool.map` picks): "
      f"{spread_rate(auto)} | {words(s_auto)} | none for `call` (the `map` row's reference) | — |")
for m, codec in maps:
    m_auto = m["baselines"]["imap_unordered_auto_chunksize"]
    s_map = m_auto["pypool_speedup"]["throughput"]
    print(f"| `map_unordered`, {m['calls']:,} no-op items, 2 workers, automatic chunksize, "
          f"{codec} codec (Python {m['python']}) | {spread_rate(m)} | "
          f"`imap_unordered(..., chunksize={m_auto['chunksize']})`: {spread_rate(m_auto)} | "
          f"{words(s_map)} | at least 1x (matching) | {verdict(s_map['median'] >= 1)} |")
print(f"| 1 worker, 1 caller, stdio, mean latency, all pinned to CPU {pinned['cpus_allowed']} | "
      f"{fig(lat(pinned, 'pypool')['mean'])} | raw Rust→Python length-prefixed pipe echo, "
      f"no protocol (`os.read`/`os.write` loop): {fig(floor(pinned))} | "
      f"{slower(p_ratio)} | <= 2x slower | {verdict(p_ratio['median'] <= 2)} |")
print(f"| same, unpinned | {fig(lat(unpinned, 'pypool')['mean'])} | raw pipe echo: "
      f"{fig(floor(unpinned))} | {slower(u_ratio)} | report | — |")
print(f"| same over ipc, unpinned | {fig(lat(ipc, 'pypool')['mean'])} | raw Unix-socket echo: "
      f"{fig(floor(ipc))} | {slower(i_ratio)} | "
      f"<= 1.25x slower | {verdict(i_ratio['median'] <= 1.25)} |")
print(f"| same over ipc, pinned (for reference) | {fig(lat(ipc_pinned, 'pypool')['mean'])} | "
      f"raw Unix-socket echo: {fig(floor(ipc_pinned))} | {slower(ip_ratio)} | — | — |")
print(f"| {startup['workers']} workers ready (handshake) | {fig(startup['pypool_ms'], 'ms', 0)} | "
      f"{startup['workers']} bare interpreters started at once answering one ping: "
      f"{fig(startup['bare_ms'], 'ms', 0)} | {slower(s_ratio)} | <= 1.2x slower | "
      f"{verdict(s_ratio['median'] <= 1.2)} |")
print()
print("The latency references are the floor of each repeat: the faster of two raw echoes, one "
      "driven with blocking `std` I/O from a thread, one with tokio from a runtime task (same "
      "frame of the size of pypool's CALL, same warm-up, same number of round trips, in "
      "interleaved blocks). Latency detail (median of the repeats, min–max):")
print()
print("| | mean | p50 | p99 | pypool's mean against this |")
print("|---|---|---|---|---|")
for title, r in (("stdio pinned", pinned), ("stdio unpinned", unpinned), ("ipc unpinned", ipc),
                 ("ipc pinned", ipc_pinned)):
    names = {"raw_blocking": "raw echo, blocking Rust I/O",
             "raw_tokio": "raw echo, tokio I/O",
             "protocol_tokio": "protocol echo (CALL decoded, handler called, RESULT "
                               "encoded, in the codec pypool picks; no pool), tokio I/O",
             "pypool": "pypool no-op call"}
    for key, name in names.items():
        f = lat(r, key)
        vs = "—" if key == "pypool" else slower(r["latency"]["pypool_mean_over"][key])
        print(f"| {title}: {name} | {fig(f['mean'])} | {fig(f['p50'])} | {fig(f['p99'])} | {vs} |")
print()
print(f"Every baseline of the throughput run ({tp['workers']} workers, {tp['concurrency']} callers, "
      f"{tp['calls']:,} no-op calls per run, {tp['repeat']} rounds):")
print()
print("| | throughput | pypool is (throughput) | mean latency | pypool is (mean latency) |")
print("|---|---|---|---|---|")
print(f"| pypool call (prefetch {tp['prefetch']}) | {spread_rate(tp)} | — | "
      f"{num(tp['latency_us']['mean'], 0)} µs | — |")
for key, b in base.items():
    sp = b["pypool_speedup"]
    mean = f"{num(b['latency_us']['mean'], 0)} µs" if b["latency_us"] else "— (batch)"
    mean_vs = words(sp["mean"]) if sp["mean"] else "—"
    print(f"| {b['label']} | {spread_rate(b)} | {words(sp['throughput'])} | {mean} | {mean_vs} |")
print()
print(f"Raw JSON: {out}/")
EOF
