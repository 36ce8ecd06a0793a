"""Python's own process pools on pypool's bench workload, for `pypool bench --baseline`.

    python python_pools.py --kind KIND --workers N --concurrency C --calls M --payload BYTES

The workload is the one `pypool bench` runs: with --payload 0 a no-op `f(i)` that returns its
small int argument, over `range(M)`; with --payload BYTES > 0 an echo of a BYTES-long bytes
object (pickled both ways, as these pools do). Each result is checked.

KIND is how the pool is driven, from the batch-job uses to the service-like ones:

- `imap_unordered`: `multiprocessing.Pool(N).imap_unordered(f, items, chunksize=CHUNKSIZE)`,
  consumed as results arrive. `--chunksize 1` is imap_unordered's own default (one task per
  item); `--chunksize auto` is the chunksize `Pool.map` computes for the same input
  (`ceil(M / (4 * N))`), applied to imap_unordered so that the chunksize is the only
  difference between the two rows.
- `executor_map`: `concurrent.futures.ProcessPoolExecutor(N).map(f, items, chunksize=...)`,
  with the same automatic chunksize by default (the executor's own default, 1, sends every item
  through its call queue alone and is its slowest way to run a batch: the documentation itself
  recommends a larger chunksize for long iterables).
- `apply_threads`: C caller threads each doing `pool.apply(f, (item,))` on a
  `multiprocessing.Pool(N)`: one blocking call at a time per thread, like callers of a service.
- `submit_threads`: C caller threads each doing `executor.submit(f, item).result()` on a
  `ProcessPoolExecutor(N)`.

Only the thread kinds have a per-call latency (timed by each caller); the map kinds report
throughput only (latency is null). Start-up is the time to create the pool and run one trivial
task per worker. Prints one JSON line: {"kind", "chunksize", "startup_ms", "duration_ms",
"calls", "errors", "throughput_per_s", "latency_us": {"mean", "p50", "p99", "p999", "max"} or
null, "first_error"}.
"""

import argparse
import itertools
import json
import math
import sys
import threading
import time


def echo(value):
    return value


def noop(_):
    return None


def percentile(sorted_values, q):
    if not sorted_values:
        return 0
    rank = max(1, int(math.ceil(q * len(sorted_values))))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def auto_chunksize(items, workers):
    """What `multiprocessing.Pool.map` uses when it is given no chunksize (CPython 3.8-3.13)."""
    chunksize, extra = divmod(items, workers * 4)
    if extra:
        chunksize += 1
    return max(1, chunksize)


def start_pool(kind, workers):
    """The pool for `kind`, warmed up with one trivial task per worker, and how to close it."""
    if kind in ("imap_unordered", "apply_threads"):
        import multiprocessing

        pool = multiprocessing.Pool(workers)
        pool.map(noop, range(workers), chunksize=1)

        def close():
            pool.close()
            pool.join()

        return pool, close
    from concurrent.futures import ProcessPoolExecutor

    executor = ProcessPoolExecutor(max_workers=workers)
    list(executor.map(noop, range(workers)))

    def close():
        executor.shutdown(wait=True)

    return executor, close


def run_map(kind, pool, items, payload, chunksize):
    """Runs the whole batch; returns (calls, errors, first_error)."""
    if kind == "imap_unordered":
        results = pool.imap_unordered(echo, items, chunksize=chunksize)
    else:
        results = pool.map(echo, items, chunksize=chunksize)
    if not payload:
        # Consumed and checked at C speed (list, len, sum), as a batch job would collect them:
        # a Python loop per result would cost this baseline more than its pool does. Every int
        # came back once: their sum says so.
        values = list(results)
        calls = len(values)
        if calls == 0 or sum(values) == sum(range(calls)):
            return calls, 0, None
        return calls, calls, "the results are not the inputs"
    calls = errors = 0
    first_error = None
    for value in results:
        calls += 1
        if len(value) != payload:
            errors += 1
            first_error = first_error or "echo returned %d bytes" % len(value)
    return calls, errors, first_error


def run_threads(kind, pool, opts, payload):
    """C caller threads share the calls; returns (calls, errors, first_error, latencies)."""
    if kind == "apply_threads":

        def call(item):
            return pool.apply(echo, (item,))

    else:

        def call(item):
            return pool.submit(echo, item).result()

    tickets = itertools.count()  # next() on a count is atomic under the GIL
    latencies = []
    errors = [0]
    first_error = []
    lock = threading.Lock()

    def caller():
        mine, failed, first = [], 0, None
        while True:
            i = next(tickets)
            if i >= opts.calls:
                break
            item = payload if opts.payload else i
            t0 = time.perf_counter_ns()
            try:
                value = call(item)
                ok = (len(value) == opts.payload) if opts.payload else value == i
                if not ok:
                    first = first or "wrong result: %r" % (value,)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ok = False
                first = first or repr(exc)
            elapsed_us = (time.perf_counter_ns() - t0) // 1000
            if ok:
                mine.append(max(1, elapsed_us))
            else:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed
            if first:
                first_error.append(first)

    threads = [threading.Thread(target=caller) for _ in range(opts.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    calls = len(latencies) + errors[0]
    return calls, errors[0], (first_error[0] if first_error else None), latencies


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--kind",
        choices=["imap_unordered", "executor_map", "apply_threads", "submit_threads"],
        required=True,
    )
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--payload", type=int, required=True)
    parser.add_argument(
        "--chunksize", default="auto", help="a number, or `auto` (what Pool.map would use)"
    )
    opts = parser.parse_args()
    payload = b"x" * opts.payload
    chunksize = None
    if opts.kind in ("imap_unordered", "executor_map"):
        if opts.chunksize == "auto":
            chunksize = auto_chunksize(opts.calls, opts.workers)
        else:
            chunksize = int(opts.chunksize)

    started = time.perf_counter()
    pool, close = start_pool(opts.kind, opts.workers)
    startup = time.perf_counter() - started

    latencies = None
    if chunksize is not None:
        items = itertools.repeat(payload, opts.calls) if opts.payload else range(opts.calls)
        t0 = time.perf_counter()
        calls, errors, first_error = run_map(opts.kind, pool, items, opts.payload, chunksize)
        duration = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        calls, errors, first_error, latencies = run_threads(opts.kind, pool, opts, payload)
        duration = time.perf_counter() - t0
    close()

    result = {
        "kind": opts.kind,
        "chunksize": chunksize,
        "startup_ms": round(startup * 1e3, 3),
        "duration_ms": round(duration * 1e3, 3),
        "calls": calls,
        "errors": errors,
        "throughput_per_s": round(calls / duration, 1) if duration > 0 else 0.0,
        "latency_us": None
        if latencies is None
        else {
            "mean": round(sum(latencies) / len(latencies), 1) if latencies else 0.0,
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "p999": percentile(latencies, 0.999),
            "max": latencies[-1] if latencies else 0,
        },
        "first_error": first_error,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
