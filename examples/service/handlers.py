"""The Python side of the example service: two handlers, served by pypool workers to the Rust
service (``src/main.rs``) and imported as plain functions by the uvicorn baseline
(``uvicorn_app.py``), so both servers run exactly the same Python code.

* ``noop()``: does nothing and returns None; what a call costs when the handler costs nothing.
* ``score(features)``: a pure-Python, deterministic CPU burn standing in for a small model
  (feature scoring, a rule engine, a tokenizer...): ``SCORE_ROUNDS`` rounds of float arithmetic,
  about 0.24 ms of one CPU on the machine the benchmark was recorded on. It returns
  ``{"score": float}``.

Calibrate ``SCORE_ROUNDS`` for another machine with ``python3 handlers.py`` (it prints what one
call takes); pypool_worker need not be installed for that.
"""

try:
    from pypool_worker import handler
except ImportError:  # `python3 handlers.py` to calibrate, without the runtime on the path
    if __name__ != "__main__":
        raise

    def handler(fn):
        return fn


# Calibrated on 2026-12-01 on the benchmark machine (2 vCPU AMD EPYC, CPython 3.11.7):
# 3200 rounds take 0.24 ms (median of 2000 calls, 0.233-0.241 ms over four runs; the fastest
# call 0.21-0.23 ms).
SCORE_ROUNDS = 3200


def burn(features, rounds=SCORE_ROUNDS):
    """``rounds`` rounds of float arithmetic over ``features``: the same work for the same input."""
    n = len(features)
    if n == 0:
        return 0.0
    acc = 0.0
    for i in range(rounds):
        acc = (acc * 0.5 + features[i % n] * i) % 1009.0
    return acc


@handler
def noop():
    return None


@handler
def score(features):
    return {"score": burn(features)}


if __name__ == "__main__":
    import statistics
    import time

    features = [0.5, 1.5, 2.5, 3.5]
    for _ in range(200):  # warm up
        burn(features)
    times = []
    for _ in range(2000):
        start = time.perf_counter()
        burn(features)
        times.append(time.perf_counter() - start)
    print("score(): %d rounds, median %.1f us, fastest %.1f us per call"
          % (SCORE_ROUNDS, statistics.median(times) * 1e6, min(times) * 1e6))
