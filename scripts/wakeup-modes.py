#!/usr/bin/env python3
"""Whether this machine puts a two-process ping-pong on one CPU or on two, with no pypool at all.

A Python parent writes a 104-byte frame to a Python child's stdin and waits for the echo, either
in a blocking ``read`` or in ``epoll`` (as an async runtime does), ``--round-trips`` times; each
mode runs ``--repeat`` times in alternation. Run it twice, as is and under ``taskset -c 0``: when
the unpinned figures are ten times the pinned ones, the pair runs on two CPUs and every wake-up
is a cross-CPU one (the "slow mode" of BENCHMARKS.md), whatever the parent waits in.

Run: ``python3 scripts/wakeup-modes.py [--round-trips N] [--repeat R]``.
"""

import argparse
import os
import select
import statistics
import subprocess
import sys
import time

CHILD = """
import os
while True:
    data = os.read(0, 65536)
    if not data:
        break
    os.write(1, data)
"""


def round_trips(mode, count):
    """Each round trip's seconds, the parent waiting in ``mode`` ("block" or "epoll")."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0)
    to_child, from_child = child.stdin.fileno(), child.stdout.fileno()
    frame = b"x" * 104
    poller = None
    if mode == "epoll":
        os.set_blocking(from_child, False)
        poller = select.epoll()
        poller.register(from_child, select.EPOLLIN | select.EPOLLET)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(to_child, frame)
            got = 0
            while got < len(frame):
                if poller is None:
                    got += len(os.read(from_child, 65536))
                    continue
                try:
                    got += len(os.read(from_child, 65536))
                except BlockingIOError:
                    poller.poll()
            times.append(time.perf_counter() - started)
    finally:
        child.stdin.close()
        child.wait()
        if poller is not None:
            poller.close()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    print("Python %s, CPUs allowed: %s; %d round trips a run, %d runs; µs" % (
        sys.version.split()[0], ",".join(map(str, cpus)), args.round_trips, args.repeat))
    print()
    print("| parent waits in | run | mean | p50 | p99 |")
    print("|---|---|---|---|---|")
    for run in range(args.repeat):
        for mode in ("block", "epoll"):
            times = sorted(round_trips(mode, args.round_trips))
            print("| %s | %d | %.1f | %.1f | %.1f |" % (
                mode, run + 1, statistics.fmean(times) * 1e6, times[len(times) // 2] * 1e6,
                times[int(len(times) * 0.99)] * 1e6))


if __name__ == "__main__":
    main()
