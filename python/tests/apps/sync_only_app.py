"""Only sync handlers: the worker must serve it without importing asyncio (test_worker.py)."""

import sys
import threading
import time

from pypool_worker import handler

PYPOOL_MAX_IN_FLIGHT = 2

# Modules the runtime imports only on the paths that need them.
LAZY_MODULES = ("asyncio", "concurrent.futures", "inspect", "argparse", "platform", "socket",
                "hmac", "hashlib", "traceback")


@handler
def loaded_lazy_modules():
    return [name for name in LAZY_MODULES if name in sys.modules]


@handler
def echo(value):
    return value


@handler
def thread_id():
    return threading.get_ident()


@handler
def spin(ctx):
    """Run until cancelled (the reader must see the cancel while this holds the sync thread)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(0.002)
    return "not cancelled"


async def _double(x):
    return x * 2


@handler
def returns_coroutine(x):
    """A sync handler returning an awaitable: the worker starts a loop just for it."""
    return _double(x)


@handler
def fail():
    raise KeyError("missing")


@handler
def surrogate_error():
    raise ValueError("bad \udcff name")
