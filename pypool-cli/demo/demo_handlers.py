"""Handlers for `pypool demo`, `pypool bench` and `pypool doctor` (embedded in the pypool binary).

Plain functions: the pool calls them by name with JSON arguments (a map becomes keyword
arguments); bytes travel as raw attachments. The command names match pool-testkit's fake
workers, so the same workload runs on `--transport fake` too.
"""

import os
import time

from pypool_worker import handler


@handler
def echo(value=None):
    """Return the value unchanged; bytes come back as an attachment (the bench's no-op)."""
    return value


@handler
def add(a, b):
    return a + b


class OutOfStock(ValueError):
    """A domain error, to show that exception types survive the trip to Rust."""


def _reserve(order, stock):
    if order["quantity"] > stock:
        raise OutOfStock("%s: wanted %d, only %d left" % (order["item"], order["quantity"], stock))
    return stock - order["quantity"]


@handler
def fail(message="the demo's failing call"):
    """Always raises, from a nested call, so the traceback has something to show."""
    _reserve({"item": message, "quantity": 3}, stock=1)


@handler
def sleep(seconds, ctx):
    """A slow call: sleeps in small steps, so a cancelled call stops early."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.cancelled:
            return None
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return seconds


@handler
def remember(key, value, ctx):
    """Keep a value in the session's state (the worker holds it until the session ends)."""
    ctx.session[key] = value
    return None


@handler
def recall(key, ctx):
    return ctx.session.get(key)


@handler
def pid():
    return os.getpid()
