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
def stderr_then_exit(code, line):
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(code)
