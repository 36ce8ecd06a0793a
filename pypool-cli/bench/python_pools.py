"""Python's own process pools on pypool's bench workload, for `pypool bench --baseline`.

    python python_pools.py --kind multiprocessing|executor --workers N --concurrency C
                           --calls M --payload BYTES

`multiprocessing` uses `multiprocessing.Pool(N)`, `executor` uses
`concurrent.futures.ProcessPoolExecutor(max_workers=N)`. C caller threads share M calls of a
no-op echo of a BYTES-long bytes object (pickled both ways, as these pools do) and time each
call. Start-up is the time to create the pool and run one trivial task per worker. Prints one
JSON line: {"kind", "startup_ms", "duration_ms", "calls", "errors", "throughput_per_s",
"latency_us": {"mean", "p50", "p99", "p999", "max"}}.
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["multiprocessing", "executor"], required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--payload", type=int, required=True)
    opts = parser.parse_args()
    payload = b"x" * opts.payload

    started = time.perf_counter()
    if opts.kind == "multiprocessing":
        import multiprocessing

        pool = multiprocessing.Pool(opts.workers)
        pool.map(noop, range(opts.workers), chunksize=1)

        def call():
            return pool.apply(echo, (payload,))

        def close():
            pool.close()
            pool.join()
    else:
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(max_workers=opts.workers)
        list(executor.map(noop, range(opts.workers)))

        def call():
            return executor.submit(echo, payload).result()

        def close():
            executor.shutdown(wait=True)

    startup = time.perf_counter() - started

    tickets = itertools.count()  # next() on a count is atomic under the GIL
    latencies = []
    errors = [0]
    lock = threading.Lock()

    def caller():
        mine, failed = [], 0
        while next(tickets) < opts.calls:
            t0 = time.perf_counter_ns()
            try:
                ok = len(call()) == opts.payload
            except Exception:
                ok = False
            elapsed_us = (time.perf_counter_ns() - t0) // 1000
            if ok:
                mine.append(max(1, elapsed_us))
            else:
                failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=caller) for _ in range(opts.concurrency)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    duration = time.perf_counter() - t0
    close()

    latencies.sort()
    done = len(latencies) + errors[0]
    result = {
        "kind": opts.kind,
        "startup_ms": round(startup * 1e3, 3),
        "duration_ms": round(duration * 1e3, 3),
        "calls": done,
        "errors": errors[0],
        "throughput_per_s": round(done / duration, 1) if duration > 0 else 0.0,
        "latency_us": {
            "mean": round(sum(latencies) / len(latencies), 1) if latencies else 0.0,
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "p999": percentile(latencies, 0.999),
            "max": latencies[-1] if latencies else 0,
        },
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
