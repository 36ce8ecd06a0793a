"""Handlers that the transport conformance suite (pool-testkit) calls in real Python workers.

Every handler is small and does exactly one observable thing, so a failing conformance test
points at the pool or transport, not at this app.
"""

import asyncio
import os
import signal
import sys
import time

from pypool_worker import handler

# Async handlers (async_sleep) may overlap; sync ones still run one at a time.
PYPOOL_MAX_IN_FLIGHT = 4


@handler
def echo(value):
    """Return the value unchanged (bytes included: they travel as attachments)."""
    return value


@handler
def add(a, b):
    return a + b


@handler
def fail(message):
    raise ValueError(message)


@handler
def noisy(value):
    """Write to stdout in every way a library might; none of it may reach the frame stream."""
    print("noise")
    os.write(1, b"garbage")
    sys.stdout.write("more noise\n")
    sys.stdout.flush()
    return value


@handler
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@handler("exit")
def exit_(code):
    os._exit(code)


@handler
def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


@handler
def pid():
    return os.getpid()


@handler
def remember(key, value, ctx):
    ctx.session[key] = value
    return None


@handler
def recall(key, ctx):
    return ctx.session.get(key)


@handler
async def async_sleep(seconds):
    await asyncio.sleep(seconds)
    return seconds


@handler
def stream(n):
    for i in range(n):
        yield i


@handler
def count():
    """Stream 0, 1, 2, ... forever: only a cancel stops it."""
    i = 0
    while True:
        yield i
        i += 1


@handler
def nested(depth):
    """A value nested ``depth`` lists deep, with 1 at the bottom."""
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@handler
def power_of_two(n, negative=False):
    return -(2 ** n) if negative else 2 ** n


@handler
def half(n):
    """n / 2 for an even n; odd numbers raise ValueError (a map's per-item errors)."""
    if n % 2:
        raise ValueError("%d is odd" % n)
    return n // 2


@handler
def spin(seconds):
    """Keep the CPU busy for ``seconds`` without any call that blocks (so it may run on the
    worker's reader thread)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


_ACTIVE = {"now": 0, "peak": 0}
_ALL_IN = None


@handler
async def meet(i):
    """Wait until four calls are running at once (or 10 s), then return the most seen running
    at once: a batch's async items run concurrently, up to max_in_flight."""
    global _ALL_IN
    if _ALL_IN is None:
        _ALL_IN = asyncio.Event()
    _ACTIVE["now"] += 1
    _ACTIVE["peak"] = max(_ACTIVE["peak"], _ACTIVE["now"])
    if _ACTIVE["now"] >= PYPOOL_MAX_IN_FLIGHT:
        _ALL_IN.set()
    try:
        await asyncio.wait_for(_ALL_IN.wait(), 10)
    finally:
        _ACTIVE["now"] -= 1
    return _ACTIVE["peak"]


@handler
def stderr_then_exit(code, line):
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(code)


# ---- descendants, for the process-tree suite (pool_testkit::tree) ---------------------------

_CHILDREN = []  # Popen objects kept alive, so their pipes stay open


def _python_child(setup):
    """A Python child that runs ``setup``, says so on its stdout and sleeps for five minutes;
    returned once it has said so (so it is set up, e.g. ignoring SIGTERM, before the pool does
    anything to it)."""
    import subprocess

    code = setup + "\nprint('up', flush=True)\nimport time\ntime.sleep(300)\n"
    child = subprocess.Popen([sys.executable, "-c", code],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    if child.stdout.readline().strip() != b"up":
        raise RuntimeError("child %d did not start" % child.pid)
    _CHILDREN.append(child)
    return child.pid


@handler
def spawn_child(kind):
    """Start a descendant that would live for five minutes and return its pid.

    * ``popen``: a subprocess (``subprocess.Popen``);
    * ``fork``: a forked copy of this worker, holding every descriptor it holds (the frame
      channel and stderr included), as multiprocessing's fork mode makes them;
    * ``ignore_term``: a subprocess that ignores SIGTERM;
    * ``setsid``: a forked copy that leaves the worker's process group and session, as a daemon
      does. It escapes the group kill; the tree suite uses it to show that such an escapee
      cannot delay the report of its worker's death.
    """
    if kind == "popen":
        return _python_child("")
    if kind == "fork":
        child = os.fork()
        if child == 0:
            try:
                time.sleep(300)
            finally:
                os._exit(0)
        return child
    if kind == "ignore_term":
        return _python_child("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    if kind == "setsid":
        # Leaves the worker's process group (a daemon would), still holding its descriptors.
        child = os.fork()
        if child == 0:
            try:
                os.setsid()
                time.sleep(300)
            finally:
                os._exit(0)
        return child
    raise ValueError("unknown child kind %r" % (kind,))


@handler
def started_then_block(seconds):
    """Stream one item once the call runs, then block: the caller knows the call is in flight."""
    yield "started"
    time.sleep(seconds)
