"""Handlers for the end-to-end tests in test_worker.py (loaded by path with --app)."""

import asyncio
import ctypes
import functools
import os
import sys
import threading
import time

from pypool_worker import Cancelled, handler

PYPOOL_MAX_IN_FLIGHT = 4


class AppError(Exception):
    pass


@handler
def echo(value):
    return value


@handler
def add(a, b):
    return a + b


@handler
def describe(a, b=2, *rest, **extra):
    return {"a": a, "b": b, "rest": list(rest), "extra": extra}


@handler
def first_ctx(ctx, x):
    return [ctx.call_id, x]


@handler("renamed")
def some_function_name():
    return "renamed"


@handler
def fail(message):
    raise ValueError(message)


@handler
def app_error():
    raise AppError("custom")


@handler
def noisy(value):
    print("noise from print")
    os.write(1, b"garbage from os.write\n")
    sys.stdout.write("noise from sys.stdout\n")
    sys.stdout.flush()
    try:  # C stdio writes to fd 1 too
        libc = ctypes.CDLL(None)
        libc.printf(b"noise from printf\n")
        libc.fflush(None)
    except (OSError, AttributeError):
        pass
    return value


@handler
def read_stdin():
    return sys.stdin.read()


@handler
def stream(n):
    for i in range(n):
        yield i


@handler
def stream_made_elsewhere(n):
    """Not a generator function, but it returns a generator: a stream all the same."""
    return (i for i in range(n))


@handler
async def astream(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield {"i": i, "b": bytes([i])}


@handler
def ticker():
    """Sync stream without end: only a cancel stops it."""
    i = 0
    while True:
        yield i
        i += 1
        time.sleep(0.001)


@handler
async def aticker():
    i = 0
    while True:
        yield i
        i += 1
        await asyncio.sleep(0.001)


@handler
def stream_fails(n):
    for i in range(n):
        yield i
    raise RuntimeError("stream broke after %d" % n)


@handler
def remember(key, value, ctx):
    ctx.session[key] = value


@handler
def recall(key, ctx):
    return ctx.session.get(key)


@handler
def ctx_info(ctx):
    return {"call_id": ctx.call_id, "session_id": ctx.session_id, "command": ctx.command,
            "has_deadline": ctx.deadline is not None, "time_left": ctx.time_left(),
            "cancelled": ctx.cancelled}


_arrivals = {}


@handler
async def rendezvous(name, n):
    """Return only once n calls with this name are running at the same time."""
    state = _arrivals.setdefault(name, {"count": 0, "event": asyncio.Event()})
    state["count"] += 1
    if state["count"] >= n:
        state["event"].set()
    await asyncio.wait_for(state["event"].wait(), timeout=20)
    return name


@handler
async def hang():
    await asyncio.Event().wait()


@handler
async def wait_for_cancel(ctx):
    try:
        await ctx.wait_cancelled()
    finally:
        pass
    return "unreachable: the task is cancelled while waiting"


@handler
def block(ctx):
    """Sync: spin until cancelled, then stop the way a cooperative handler should."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(0.005)
    return "not cancelled"


_gates = {}


def _gate(name):
    return _gates.setdefault(name, (threading.Event(), threading.Event()))


@handler
def gate(name):
    """Sync: mark itself started, then block until gate_release(name) (or 30 s)."""
    started, release = _gate(name)
    started.set()
    if not release.wait(timeout=30):
        raise TimeoutError("gate %r was never released" % name)
    return "released"


@handler
async def gate_started(name):
    """Async: return once the sync gate(name) handler is running."""
    started, _ = _gate(name)
    # The default executor, not the worker's sync thread, which gate() occupies.
    return await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)


@handler
async def gate_release(name):
    _gate(name)[1].set()
    return True


@handler
def raise_cancelled():
    raise Cancelled("nobody asked")


@handler
def fd_inode(fd):
    """What descriptor ``fd`` refers to now (its inode), or None when it is closed."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


@handler
def env(name):
    return os.environ.get(name)


@handler
def big(n):
    return b"x" * n


@handler
def unencodable():
    return {1, 2}


@handler
def unencodable_if(flag):
    return {1, 2} if flag else "fine"


@handler
def not_a_number():
    return float("nan")


def _sync_wrapper(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@handler
@_sync_wrapper
async def wrapped_async(x):
    await asyncio.sleep(0)
    return x * 2


@handler
def sys_exit(code):
    sys.exit(code)


# ---- where sync handlers run (the reader's fast path) ---------------------------------------


@handler
def thread_name():
    """A quick sync handler: it runs on the reader thread."""
    return threading.current_thread().name


@handler
def thread_name_after_a_nap():
    """It sleeps, so it runs on the sync thread."""
    time.sleep(0)
    return threading.current_thread().name


@handler(inline=False)
def thread_name_kept_off_the_reader():
    return threading.current_thread().name


@handler
def burn(ms):
    """Busy for ``ms`` milliseconds without any name that looks like blocking."""
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass
    return threading.current_thread().name
