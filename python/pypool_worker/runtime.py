"""The pypool worker process: handshake, call dispatch, cancellation, sessions and shutdown.

Threads and why (thread handoffs cost tens of microseconds under the GIL, so a call makes at
most one):

* the **reader** does the blocking frame reads and handles every message that needs no handler
  itself: it answers ``ping``, sets a call's cancellation flag on ``cancel``, drops session state
  on ``session_end``, and exits on ``shutdown`` and end-of-file. Because it never runs handler
  code, the pool gets its answers while handlers are busy. In a sync-only app the reader is the
  main thread;
* one **sync thread** runs sync handlers (and sync generators) one at a time, in arrival order.
  The reader hands it each call through a SimpleQueue: the single handoff of a sync call. It is
  always the same thread, so thread-local state a handler sets is still there on its next call;
* an **asyncio loop** exists only when it is needed: apps with an ``async def`` handler (or
  async generator) run it on the main thread, and the reader hands it calls with
  ``call_soon_threadsafe``. A sync-only app never imports asyncio (about 35 ms of start-up),
  unless a sync handler returns an awaitable: then a loop is started on a thread to finish it;
* small watcher threads make the process exit on SIGTERM and when its parent goes away.

A reply is encoded and written by the thread that produced it (the sync thread, the loop, or
the reader for pongs and errors it detects itself); the channel's write lock keeps frames whole.
Every way out of the process is ``os._exit``: the pool wants a prompt exit, not a wait for
handler threads.

Start-up time matters (a pool may start dozens of workers at once), so modules that only some
paths need (asyncio, inspect, traceback, socket, hmac, importlib.util, ...) are imported where
they are used, not here.

Session state: ``ctx.session`` is a plain dict per session id. The reader creates it when a
call names the session and drops it on ``session_end``, both in wire order, so a call sent
before ``session_end`` sees the old state and one sent after gets a fresh dict (a call still
running keeps the dict it was given). Handlers share it under these rules: sync handlers never
overlap each other, and async handlers interleave only at ``await``; but a sync and an async
handler of the same session can run at the same time (``max_in_flight`` > 1), and then only
single dict operations are atomic, so a read-modify-write that both kinds do needs the app's
own ``threading.Lock``.
"""

import collections
import faulthandler
import functools
import io
import itertools
import os
import signal
import sys
import threading
import time
import types
from threading import get_ident
from collections.abc import Awaitable
from queue import SimpleQueue

from . import __version__
from . import protocol
from .protocol import FrameTooLarge, ProtocolError, encode_result

# The reader writes its outbox once it holds this many messages, even with more calls to run:
# replies do not wait behind many others.
_OUTBOX_MESSAGES = 32

EXIT_OK = 0
EXIT_STARTUP = 2
EXIT_PROTOCOL = 3

FEATURES = ["stream", "cancel", "async", "session_state", "flow", "batch"]
PARENT_POLL_SECONDS = 0.5
# Error texts are capped so that one huge message cannot make the error itself unsendable.
_MAX_ERROR_TEXT = 1 << 20

_THIS_FILE = __file__

# Results that are certainly not a generator or an awaitable: no isinstance checks for them.
_PLAIN_RESULTS = frozenset((type(None), bool, int, float, str, bytes, list, dict, tuple))


class _Stream:
    """A generator that a handler returned on the reader, handed to the sync thread to run (in
    the place of the call's arguments): a stream waits for the pool's CREDIT, which only a free
    reader can read."""

    __slots__ = ("gen",)

    def __init__(self, gen):
        self.gen = gen


# What the reader's _run_sync returns for a call it handed to the sync thread (which answers it).
_HANDED_OFF = object()


# ============================================================================================
# Public API: @handler, Context, Cancelled


class Cancelled(Exception):
    """Raised by ``Context.check_cancelled()`` once the pool has cancelled the call.

    A handler may also raise it itself; the worker then answers ``cancelled`` if a cancel was
    requested, and reports it as an ordinary error otherwise.
    """


Cancelled.__module__ = "pypool_worker"


class UsageError(Exception):
    """Bad command-line options or an app the worker cannot serve."""


_HANDLERS = {}  # command name -> _Handler, filled by @handler while the app module imports


# Code flags (inspect.CO_COROUTINE and CO_ASYNC_GENERATOR; their values are fixed by CPython).
_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200


_CO_GENERATOR = 0x20
# Names that make a handler run on the sync thread rather than on the reader: through the first
# five it watches its call while it runs (it must see a CANCEL, which the reader has to be free to
# read); the others are how code usually blocks (sleeps, waits for an event, a lock, a process, a
# socket), and a handler that blocks on the reader would hold up everything behind it, or wait
# forever for a call the reader cannot read.
_KEEPS_READER_BUSY = frozenset((
    "cancelled", "check_cancelled", "wait_cancelled", "time_left", "deadline",
    "sleep", "wait", "acquire", "join", "recv", "recv_into", "accept", "communicate",
    "select", "poll", "input", "urlopen", "request", "get_nowait",
))
# Two inline calls in a row that take longer than this make their handler run on the sync thread
# from then on: the reader must not be away from the channel for long.
INLINE_BUDGET_SECONDS = 0.005
# How long a slice of a batch runs before the batch looks for a cancel (and, on the reader,
# reads incoming messages), and the most items in one slice.
_BATCH_LOOK_SECONDS = 0.001
# How long the reader runs quick calls it has already read before it looks at the channel again
# (for a CANCEL of a call behind them, or a PING).
_LOCAL_LOOK_SECONDS = 0.0002
_MAX_SLICE = 4096


def _inline_candidate(fn):
    code = getattr(fn, "__code__", None)
    if type(fn) is not types.FunctionType or code is None:
        return False  # callable objects, partials, builtins: nothing to inspect, no fast path
    if code.co_flags & _CO_GENERATOR:
        return False
    return not (_KEEPS_READER_BUSY & set(code.co_names))


def _describe(fn):
    """(runs on the loop, takes ctx, position of ctx among positional parameters or None)."""
    if type(fn) is types.FunctionType and not fn.__dict__:
        # A plain function with no attributes (so no __wrapped__, __signature__ or coroutine
        # mark): its code object says all that inspect would, without importing inspect.
        code = fn.__code__
        on_loop = bool(code.co_flags & (_CO_COROUTINE | _CO_ASYNC_GENERATOR))
        names = code.co_varnames
        positional = code.co_argcount  # positional-only ones first, then positional-or-keyword
        for i in range(code.co_posonlyargcount, positional):
            if names[i] == "ctx":
                return on_loop, True, i
        keyword_only = names[positional:positional + code.co_kwonlyargcount]
        return on_loop, "ctx" in keyword_only, None

    import inspect  # wrapped functions, partials, callable objects, builtins

    on_loop = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: no ctx for them
        params = []
    positional = 0
    for p in params:
        if p.name == "ctx" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return on_loop, True, positional if p.kind == p.POSITIONAL_OR_KEYWORD else None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return on_loop, False, None


class _Handler:
    """A registered function plus what the runtime needs to know to call it."""

    __slots__ = ("name", "fn", "on_loop", "wants_ctx", "ctx_index", "inline", "slow_once")

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn
        # Coroutine and async-generator functions run on the loop. Anything else runs on the
        # sync thread; if it turns out to return an awaitable (a sync wrapper around an async
        # function), the loop finishes it. ctx_index: where `ctx` goes among positional
        # arguments, or None to pass it by keyword.
        self.on_loop, self.wants_ctx, self.ctx_index = _describe(fn)
        # Whether its calls may run on the reader thread itself (the fast path, no thread
        # handoff). Not for generators (a stream waits for the pool's credit, which the reader
        # must be free to read), nor for handlers that watch their cancellation or deadline
        # (the reader must be free to read a CANCEL); a handler found to run long loses it.
        self.inline = not self.on_loop and _inline_candidate(fn)
        self.slow_once = False  # its last call on the reader took longer than the budget

    def judge_inline(self, took):
        """A call of this handler ran on the reader for ``took`` seconds: past the budget twice
        in a row, its calls run on the sync thread from now on. (Twice: once may be the machine,
        not the handler, when the thread was not scheduled for a while.)"""
        if took > INLINE_BUDGET_SECONDS:
            if self.slow_once:
                self.inline = False
            self.slow_once = True
        else:
            self.slow_once = False

    def bind(self, args, ctx):
        """Map the call's ``args`` onto (positional, keyword) arguments, adding ``ctx``."""
        if isinstance(args, dict):
            pos, kw = [], dict(args)
        elif isinstance(args, list):
            pos, kw = list(args), {}
        elif args is None:
            pos, kw = [], {}
        else:
            pos, kw = [args], {}
        if self.wants_ctx:
            if "ctx" in kw:
                raise TypeError("%s() takes ctx from the worker; the call may not pass 'ctx'"
                                % self.name)
            if self.ctx_index is not None and len(pos) > self.ctx_index:
                # def f(ctx, a) called with [1]: ctx must take its own slot, not swallow 1.
                pos.insert(self.ctx_index, ctx)
            else:
                kw["ctx"] = ctx
        return pos, kw


def handler(name_or_fn=None, name=None, inline=None):
    """Register a function as a command: ``@handler``, ``@handler("name")`` or ``@handler(name=...)``.

    ``inline=False`` keeps a sync handler off the worker's reader thread: use it for a handler
    that may block for long without looking like it (see the README: "Where sync handlers run").
    ``inline=True`` asks for the fast path even when the runtime would not choose it (it is
    still never used for generators). The function is returned unchanged, so it stays callable
    from ordinary code and tests.
    """
    if callable(name_or_fn) and not isinstance(name_or_fn, str):
        return _register(name_or_fn, name, inline)
    if name_or_fn is not None and not isinstance(name_or_fn, str):
        raise TypeError("@handler takes a function or a command name, not %r" % (name_or_fn,))
    if name_or_fn is not None and name is not None:
        raise TypeError("@handler got two names: %r and %r" % (name_or_fn, name))
    chosen = name_or_fn if name_or_fn is not None else name

    def decorate(fn):
        return _register(fn, chosen, inline)

    return decorate


def _register(fn, name, inline=None):
    if not callable(fn):
        raise TypeError("@handler needs a callable, not %r" % (fn,))
    if name is None:
        name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name:
        raise ValueError("a handler needs a non-empty command name")
    registered = _Handler(name, fn)
    if inline is not None and not registered.on_loop:
        code = getattr(fn, "__code__", None)
        generator = code is not None and code.co_flags & _CO_GENERATOR
        registered.inline = bool(inline) and not generator
    _HANDLERS[name] = registered
    return fn


class Context:
    """What a handler knows about its call; it gets one by declaring a parameter named ``ctx``.

    * ``call_id``: the pool's id of this call;
    * ``command``: the command name;
    * ``session_id``: the session the call belongs to, or None;
    * ``session``: a dict kept in this worker for the session until the pool ends it (a fresh
      dict for a call without a session);
    * ``deadline``: ``time.monotonic()`` value by which the caller stops waiting, or None;
    * ``cancelled`` / ``check_cancelled()`` / ``await wait_cancelled()``: cancellation.
    """

    __slots__ = ("call_id", "command", "session_id", "session", "deadline",
                 "_cancelled", "_event", "_loop")

    def __init__(self, call_id=0, session_id=None, session=None, deadline=None, command="",
                 _loop=None):
        self.call_id = call_id
        self.command = command
        self.session_id = session_id
        self.session = {} if session is None else session
        self.deadline = deadline
        # Set by the reader thread, read by the handler's thread: a plain attribute is enough
        # (its assignment is atomic), and costs nothing per call unlike a threading.Event.
        self._cancelled = False
        self._event = None  # asyncio.Event for wait_cancelled(), made on first use
        self._loop = _loop  # the worker's loop, once the call runs there

    @property
    def cancelled(self):
        """True once the pool has cancelled this call."""
        return self._cancelled

    def check_cancelled(self):
        """Raise Cancelled if the pool has cancelled this call (for sync handlers' loops)."""
        if self._cancelled:
            raise Cancelled("call %s was cancelled" % (self.call_id,))

    def time_left(self):
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    async def wait_cancelled(self):
        """Return once the pool has cancelled this call."""
        import asyncio  # already loaded: something is running a coroutine

        if self._cancelled:
            return
        if self._loop is not None and asyncio.get_running_loop() is self._loop:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        else:
            # Another event loop (e.g. asyncio.run inside a sync handler) cannot be woken
            # safely from the worker's loop, so it polls the flag instead.
            while not self._cancelled:
                await asyncio.sleep(0.05)

    def _wake_waiters(self):
        # On the worker loop's thread, after the reader set _cancelled.
        if self._event is not None:
            self._event.set()

    def __repr__(self):
        return "Context(call_id=%r, command=%r, session_id=%r, cancelled=%r)" % (
            self.call_id, self.command, self.session_id, self.cancelled)


# ============================================================================================
# Logging, errors, exiting

_log_prefix = "pypool_worker[]"


def _set_log_prefix(worker_id):
    global _log_prefix
    _log_prefix = "pypool_worker[%s]" % worker_id


def log(message):
    """Write one line to stderr, which the pool turns into log events."""
    line = "%s %s\n" % (_log_prefix, message)
    try:
        # os.write, not sys.stderr: callable from signal handlers and any thread, unbuffered.
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


# Called by _exit before the process ends, e.g. to let a message queue drain (zmq). Each must
# return within a bounded time whatever thread calls it.
_EXIT_HOOKS = []


def _exit(code, reason=None):
    if reason:
        log(reason)
    for hook in _EXIT_HOOKS:
        try:
            hook()
        except BaseException:  # exiting regardless
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a stream mid-write in another thread; losing it is fine
            pass
    os._exit(code)


def _type_name(cls):
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins"):
        return cls.__qualname__
    return "%s.%s" % (module, cls.__qualname__)


def _user_traceback(exc):
    """The exception's traceback without the runtime's (and importlib's) leading frames."""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename != _THIS_FILE and not filename.startswith("<frozen importlib"):
            break
        tb = tb.tb_next
    return tb


def _cap(text):
    """An error text the pool can always receive: bounded, and encodable as UTF-8."""
    if len(text) > _MAX_ERROR_TEXT:
        text = text[:_MAX_ERROR_TEXT] + "\n... (truncated)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from os.fsdecode) would make the error itself unsendable.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def error_info(exc, message=None):
    """The protocol's structured error for an exception."""
    if message is None:
        try:
            message = str(exc)
        except Exception:
            message = "<unprintable %s>" % type(exc).__qualname__
    try:
        import traceback  # only errors need it

        tb_text = "".join(traceback.format_exception(type(exc), exc, _user_traceback(exc)))
    except Exception:
        tb_text = None
    return {"type": _type_name(type(exc)), "message": _cap(message),
            "traceback": None if tb_text is None else _cap(tb_text)}


# ============================================================================================
# Channel: one framed duplex stream


class _Channel:
    """Frames over a byte stream: thread-safe whole-frame writes, blocking reads.

    Only one thread reads at a time (the handshake, then the reader thread); any thread writes.
    """

    # Calls may run on the reader thread between reads (the fast path): the pool sees this
    # channel's worker die from its process and pings it only when idle, so a reader busy with a
    # short handler misses nothing.
    inline_ok = True

    def __init__(self, readinto, writev, fileno=None):
        self._frames = protocol.FrameReader(readinto)
        # The next message when it came alone (see FrameReader.read_alone), else None.
        self.read_alone = self._frames.read_alone
        self._writev = writev
        self._lock = threading.Lock()
        self._poll = None
        if fileno is not None:
            import select

            self._poll = select.poll()
            self._poll.register(fileno, select.POLLIN)
        self.codec = protocol.JSON  # until WELCOME says otherwise
        self.max_frame = protocol.DEFAULT_MAX_FRAME

    def pending(self):
        """Whether a message can be read without waiting: buffered, or bytes on the channel."""
        if self._frames.buffered():
            return True
        return self._poll is not None and bool(self._poll.poll(0))

    def pending_after_read(self):
        """``pending()`` right after ``recv()``: when that read emptied the channel, no system
        call is made to learn that it is still empty (in a strict call-and-reply exchange it
        always is, and the poll would cost a system call per call). A frame that arrives in
        between is read after the calls already here have run, as if it came a moment later."""
        if self._frames.buffered():
            return True
        if self._frames.drained:
            return False
        return self._poll is not None and bool(self._poll.poll(0))

    @property
    def max_frame(self):
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value):
        self._max_frame = value
        self._frames.max_frame = value  # enforced on incoming frames too

    def encode(self, header):
        return protocol.encode_frame(header, self.codec, self._max_frame)

    def encode_result(self, call_id, value):
        """``encode`` of a call's successful RESULT, on the fast path."""
        return encode_result(call_id, value, self.codec, self._max_frame)

    def write(self, parts):
        try:
            with self._lock:
                protocol.write_all(self._writev, parts)
        except OSError as exc:
            # The pool closed its end: nobody is left to answer, which is the EOF case.
            _take_down_group("channel closed while writing (%s), exiting" % exc)

    def write_whole(self, data):
        """``write`` of a message that is one ``bytes`` (no attachments)."""
        lock = self._lock
        try:
            lock.acquire()  # not `with`: twice as fast, and this runs for every call
            try:
                written = self._writev([data])
                if written != len(data):
                    protocol.write_all(self._writev, [memoryview(data)[written:]])
            finally:
                lock.release()
        except OSError as exc:
            _take_down_group("channel closed while writing (%s), exiting" % exc)

    def encode_plain_result(self, call_id, value):
        """``protocol.encode_plain_result`` in this channel's codec and frame limit."""
        return protocol.encode_plain_result(call_id, value, self.codec, self._max_frame)

    def send(self, header):
        self.write(self.encode(header))

    def write_many(self, messages):
        """Write several encoded messages with as few system calls as possible."""
        if len(messages) == 1:
            self.write(messages[0])
        else:
            self.write([part for parts in messages for part in parts])

    def recv(self):
        """The next message, or None once the pool has closed the channel."""
        try:
            body = self._frames.read()
        except OSError as exc:
            log("channel read failed: %s" % exc)
            return None
        if body is None:
            return None
        return protocol.decode_body(body)


def _protect_stdout():
    """Point fd 1 and sys.stdout at stderr so stray prints cannot reach the pool's stream."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _open_stdio():
    # os.dup gives non-inheritable descriptors: processes that handlers spawn do not hold the
    # pool's pipes open, so the pool still sees EOF when this worker dies.
    frames_out = os.dup(1)
    frames_in = os.dup(0)
    _protect_stdout()
    # Stdin becomes /dev/null so that input() or a child process cannot swallow frames.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # FileIO.readinto and a partial of os.writev: no Python frame per system call.
    reader = io.FileIO(frames_in, "rb", closefd=False)
    return _Channel(reader.readinto, functools.partial(os.writev, frames_out), frames_in)


def _open_ipc(secret):
    import hashlib  # only the ipc transport needs these
    import hmac
    import socket

    _protect_stdout()
    path = os.environ.get("PYPOOL_IPC_PATH")
    if not path:
        raise UsageError("--transport ipc needs PYPOOL_IPC_PATH in the environment")
    if secret is None:
        raise UsageError("--transport ipc needs the pool's secret on the descriptor named by "
                         "PYPOOL_SECRET_FD")
    try:
        key = bytes.fromhex(secret)
    except ValueError:
        raise UsageError("the pool's secret is not a hex string") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    channel = _Channel(sock.recv_into, sock.sendmsg, sock.fileno())
    challenge = channel.recv()
    if challenge is None:
        _exit(EXIT_OK, "channel closed before the challenge, exiting")
    nonce = challenge.get("nonce")
    if challenge["type"] != "challenge" or not isinstance(nonce, str):
        raise ProtocolError("expected a challenge with a string nonce, got %r" % challenge["type"])
    mac = hmac.new(key, nonce.encode("utf-8"), hashlib.sha256).hexdigest()
    channel.send({"type": "auth", "mac": mac})
    return channel


def _open_channel(transport, secret, opts=None):
    if transport == "stdio":
        return _open_stdio()
    if transport == "ipc":
        return _open_ipc(secret)
    if transport == "zmq":
        from . import zmq_transport  # imports pyzmq, which only this transport needs

        _protect_stdout()
        channel = zmq_transport.open_channel(
            secret,
            connect=None if opts is None else opts.connect,
            secret_file=None if opts is None else opts.secret_file,
            log=log,
            on_closed=lambda reason: _exit(EXIT_OK, reason))
        _EXIT_HOOKS.append(channel.flush_and_close)
        return channel
    raise UsageError("unknown transport %r" % (transport,))


# ============================================================================================
# Message field checks: a message missing a field its type needs is a protocol error.


def _u64(msg, field):
    value = msg.get(field)
    if type(value) is not int or value < 0:
        raise ProtocolError("%s message: %r must be a non-negative integer, got %r"
                            % (msg["type"], field, value))
    return value


def _opt_u64(msg, field):
    return None if msg.get(field) is None else _u64(msg, field)


def _str(msg, field):
    value = msg.get(field)
    if not isinstance(value, str):
        raise ProtocolError("%s message: %r must be a string, got %r" % (msg["type"], field, value))
    return value


def _opt_str(msg, field):
    return None if msg.get(field) is None else _str(msg, field)


# ============================================================================================
# The worker


class _Call:
    __slots__ = ("id", "handler", "session_id", "session", "deadline", "ctx", "cancelled", "task",
                 "on_loop", "uses_loop", "granted", "sent", "_credit", "batch", "scalars")

    def __init__(self, call_id, handler_, session_id, session, deadline, window, batch=None):
        self.id = call_id
        self.handler = handler_
        self.session_id = session_id
        self.session = session  # the session's dict, taken when the call was read (wire order)
        self.deadline = deadline
        # The handler's Context, made only if the handler takes one (see context()).
        self.ctx = None
        # Set by the reader, read by the thread running the call: a plain attribute is enough.
        self.cancelled = False
        self.task = None
        # Flow control: stream items the pool has allowed so far (None: no limit), and items
        # sent. Each has one writer (the reader thread or the loop; the producer), so neither
        # loses an update; the producer may send while sent < granted.
        self.granted = window
        self.sent = 0
        self._credit = None  # threading.Condition, or asyncio.Event on the loop; made on first wait
        # True exactly while the call's task is suspended inside handler code on the loop,
        # i.e. while task.cancel() would interrupt the handler and nothing else.
        self.on_loop = False
        # True once the call belongs to the loop (set before the loop is told about it), so a
        # cancel must go there too; a sync call that never returns an awaitable stays False.
        self.uses_loop = False
        # For a batch call (a chunk of a map): how many items it has; None for a plain call.
        self.batch = batch
        # A batch whose items the pool says are each one plain value (number, string, bool).
        self.scalars = False

    def cancel(self):
        """The pool cancelled the call (on the reader thread)."""
        # The call's flag first, its Context's second: context() publishes the Context before
        # it reads the flag, so one of the two always sees the other.
        self.cancelled = True
        ctx = self.ctx
        if ctx is not None:
            ctx._cancelled = True

    def context(self, loop=None):
        """The Context the handler receives, made on first use."""
        ctx = self.ctx
        if ctx is None:
            session = {} if self.session is None else self.session
            ctx = Context(self.id, self.session_id, session, self.deadline, self.handler.name,
                          _loop=loop)
            self.ctx = ctx
            if self.cancelled:
                ctx._cancelled = True
        return ctx


def _apply(fn, args):
    """Call ``fn`` with a call's ``args``: a map is keywords, a list positional arguments, null
    none, anything else the one argument."""
    kind = type(args)
    if kind is dict:
        return fn(**args)
    if kind is list:
        return fn(*args)
    if args is None:
        return fn()
    return fn(args)


def _error_index(error):
    return error["index"]


def _apply_bound(fn, bound):
    pos, kw = bound
    return fn(*pos, **kw)


def _new_loop():
    import asyncio  # here, not at the top: only apps that need a loop pay for importing it

    return asyncio.new_event_loop()


def _run_loop(loop):
    import asyncio

    asyncio.set_event_loop(loop)
    loop.run_forever()


class Worker:
    def __init__(self, channel, handlers, max_in_flight, app_name="", worker_id=""):
        self.channel = channel
        self.handlers = handlers
        self.max_in_flight = max_in_flight
        self.app_name = app_name
        self.worker_id = worker_id
        # id -> _Call. The reader adds a call; the thread that sends its final reply removes
        # it. Single dict operations are atomic, and only the reader adds, so no lock.
        self._calls = {}
        self._sessions = {}  # session id -> dict; touched only by the reader (wire order)
        self._sync_queue = SimpleQueue()  # (call, args) for the sync thread
        # Calls handed to the sync thread, and calls it has finished: each has one writer (the
        # reader, the sync thread), and the thread is idle when they are equal.
        self._sync_sent = 0
        self._sync_done = 0
        self._loop = None  # the asyncio loop, once there is one
        self._loop_lock = threading.Lock()
        # Sync calls read but not started, in arrival order: run on the reader when they may,
        # else handed to the sync thread.
        self._local = collections.deque()
        # Replies the reader produced, written together before it next waits for input.
        self._outbox = []
        self._reader_ident = None
        self._inline_ok = getattr(channel, "inline_ok", False)
        self._write_many = getattr(channel, "write_many", None) or self._write_each
        self._encode_result = getattr(channel, "encode_result", None) or (
            lambda call_id, value: channel.encode({"type": "result", "id": call_id, "ok": value}))
        self._pending = getattr(channel, "pending", None) or (lambda: False)
        self._pending_after_read = getattr(channel, "pending_after_read", None) or self._pending

    # ---- handshake ---------------------------------------------------------------------

    def handshake(self):
        self.channel.send({
            "type": "hello",
            "protocol": protocol.PROTOCOL_VERSION,
            "runtime": "pypool_worker/%s" % __version__,
            "python": _python_version(),
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            "codecs": protocol.available_codecs(),
            "commands": sorted(self.handlers),
            "max_in_flight": self.max_in_flight,
            "features": list(FEATURES),
        })
        msg = self.channel.recv()
        if msg is None:
            _exit(EXIT_OK, "channel closed before WELCOME, exiting")
        if msg["type"] == "shutdown":
            _exit(EXIT_OK, "shutdown before WELCOME, exiting")
        if msg["type"] != "welcome":
            raise ProtocolError("expected welcome, got %r" % msg["type"])
        codec = _str(msg, "codec")
        if codec not in protocol.available_codecs():
            raise ProtocolError("WELCOME chose codec %r, which this worker did not offer" % codec)
        max_frame = _u64(msg, "max_frame")
        if max_frame == 0:
            raise ProtocolError("WELCOME announced max_frame 0")
        pool_worker_id = msg.get("worker_id")
        if not self.worker_id and isinstance(pool_worker_id, str) and pool_worker_id:
            self.worker_id = pool_worker_id
            _set_log_prefix(pool_worker_id)
        self.channel.codec = codec
        self.channel.max_frame = max_frame
        log("ready: app %s, %d commands, codec %s, max_in_flight %d"
            % (self.app_name, len(self.handlers), codec, self.max_in_flight))

    # ---- threads -----------------------------------------------------------------------

    def serve_forever(self):
        if not all(h.on_loop for h in self.handlers.values()):
            threading.Thread(target=self._sync_forever, name="pypool-sync", daemon=True).start()
        if any(h.on_loop for h in self.handlers.values()):
            # Async handlers run on the main thread, as they would under asyncio.run(); the
            # reader gets a thread of its own.
            self._loop = _new_loop()
            threading.Thread(target=self._read_forever, name="pypool-reader", daemon=True).start()
            _run_loop(self._loop)
        else:
            self._read_forever()

    def _ensure_loop(self):
        """The loop, started on a thread of its own if this sync-only app had none yet.

        The reader looks at ``_loop`` only for calls marked ``uses_loop``, which happens after
        ``_loop`` is set.
        """
        with self._loop_lock:
            if self._loop is None:
                loop = _new_loop()
                threading.Thread(target=_run_loop, args=(loop,), name="pypool-loop",
                                 daemon=True).start()
                self._loop = loop
            return self._loop

    def _read_forever(self):
        self._reader_ident = threading.get_ident()
        recv = self.channel.recv
        dispatch = self._dispatch
        pending = self._pending_after_read
        local = self._local
        call_direct = self._call_direct
        # Pipes and sockets: a message that came alone is read, decoded and, when it is a call
        # the reader may run, answered in a few calls (the strict call-and-reply exchange);
        # anything else takes the general path below.
        read_alone = getattr(self.channel, "read_alone", None) if self._inline_ok else None
        try:
            while True:
                if read_alone is not None and not local:
                    try:
                        msg = read_alone()
                    except OSError as exc:  # as recv() takes it: the pool is gone
                        log("channel read failed: %s" % exc)
                        _take_down_group("channel closed, exiting")
                    if msg is not None:
                        if msg["type"] != "call" or not call_direct(msg):
                            dispatch(msg)
                            self._run_local()
                        continue
                try:
                    msg = recv()
                except protocol.BadCall as exc:
                    msg = exc
                if msg is None:
                    _take_down_group("channel closed, exiting")
                # Everything readable now is read first (a CANCEL for a call behind may be in
                # it); then the calls run, and their replies go out together.
                more = pending()
                if type(msg) is not dict:
                    self._reject_call(msg.header, str(msg))
                elif more or local or msg["type"] != "call" or not call_direct(msg):
                    dispatch(msg)
                if not more:
                    self._run_local()
        except ProtocolError as exc:
            _exit(EXIT_PROTOCOL, "protocol error: %s" % exc)
        except KeyboardInterrupt:
            raise  # SIGINT on the main thread: the interpreter's usual way out
        except BaseException as exc:  # a bug here would leave a worker that never answers
            _exit(EXIT_PROTOCOL, "reader failed: %r" % (exc,))

    # ---- messages (reader thread) ------------------------------------------------------

    def _dispatch(self, msg):
        kind = msg["type"]
        if kind == "call":
            self._on_call(msg)
        elif kind == "ping":
            self._send({"type": "pong", "id": _u64(msg, "id")})
        elif kind == "cancel":
            self._on_cancel(msg)
        elif kind == "credit":
            self._on_credit(msg)
        elif kind == "session_end":
            self._sessions.pop(_str(msg, "session"), None)
        elif kind == "shutdown":
            self._on_shutdown()
        else:
            # Not ours to answer; a newer pool may send types this runtime predates.
            log("ignoring unexpected %r message" % kind)

    def _on_call(self, msg):
        # The checks of _u64/_str spelled out: this runs for every call.
        get = msg.get
        call_id = get("id")
        command = get("command")
        session_id = get("session")
        timeout_ms = get("timeout_ms")
        window = get("window")
        batch = get("batch")
        if type(call_id) is not int or call_id < 0:
            _u64(msg, "id")
        if type(command) is not str:
            _str(msg, "command")
        if session_id is not None and type(session_id) is not str:
            _str(msg, "session")
        if timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms < 0):
            _u64(msg, "timeout_ms")
        if window is not None and (type(window) is not int or window < 1):
            raise ProtocolError("call message: 'window' must be a positive integer, got %r"
                                % (window,))
        calls = self._calls
        if call_id in calls:
            raise ProtocolError("call id %d is already running" % call_id)
        handler_ = self.handlers.get(command)
        if handler_ is None:
            self._send({"type": "result", "id": call_id, "error": {
                "type": "UnknownCommand",
                "message": "unknown command %r; known commands: %s"
                           % (command, ", ".join(sorted(self.handlers))),
                "traceback": None,
            }})
            return
        args = get("args")
        if batch:
            if type(args) is not list:
                self._reject_call(msg, "a batch call's args must be a list of the items' "
                                       "arguments, not %s" % type(args).__name__)
                return
            batch = len(args)
        else:
            batch = None
        session = None if session_id is None else self._sessions.setdefault(session_id, {})
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        call = _Call(call_id, handler_, session_id, session, deadline, window, batch)
        if batch is not None and get("scalars") is True:
            call.scalars = True
        calls[call_id] = call
        if handler_.on_loop:
            call.uses_loop = True
            self._loop.call_soon_threadsafe(self._start_on_loop, call, args, None)
        else:
            self._local.append((call, args))

    # ---- sync calls on the reader (the fast path) ----------------------------------------

    def _call_direct(self, msg):
        """Run a call that came alone (nothing read is waiting, nothing else is readable) from
        its message to its reply in one go: the strict call-and-reply exchange, where the
        general path's queue, call record and outbox are pure cost.

        Only for what the general path would run on the reader just the same: a sync handler
        allowed there, without ``ctx``, session or batch, with the sync thread idle. Anything
        else, and any field the general path would refuse, returns False having done nothing,
        and the general path takes the message. A handler that returns a stream or an awaitable
        gets its call record then and continues as on the general path.
        """
        get = msg.get
        handler_ = self.handlers.get(get("command"))
        if (handler_ is None or not handler_.inline or handler_.wants_ctx
                or not self._inline_ok or self._sync_sent != self._sync_done
                or get("session") is not None or get("batch")):
            return False
        call_id = get("id")
        timeout_ms = get("timeout_ms")
        window = get("window")
        if (type(call_id) is not int or call_id < 0 or call_id in self._calls
                or (timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms < 0))
                or (window is not None and (type(window) is not int or window < 1))):
            return False
        args = get("args")
        fn = handler_.fn
        clock = time.perf_counter
        started = clock()
        try:
            # _apply, inline: calling it costs a Python frame, 0.2-0.3 us of this path.
            kind = type(args)
            if kind is dict:
                value = fn(**args)
            elif kind is list:
                value = fn(*args)
            elif args is None:
                value = fn()
            else:
                value = fn(args)
            failed = None
        except BaseException as exc:
            failed = exc
        took = clock() - started
        if took > INLINE_BUDGET_SECONDS or handler_.slow_once:  # else judging changes nothing
            handler_.judge_inline(took)
        parts = frame = None
        if failed is None and type(value) in _PLAIN_RESULTS:
            try:
                frame = self.channel.encode_plain_result(call_id, value)
                if frame is None:
                    parts = self._encode_result(call_id, value)
            except Exception:
                pass  # the general path reports it as the call's error
        if frame is not None:
            if self._outbox:
                self._outbox.append([frame])
                self._flush()
            else:
                self.channel.write_whole(frame)
            return True
        if parts is None:
            deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
            call = _Call(call_id, handler_, None, None, deadline, window)
            self._calls[call_id] = call
            try:
                if failed is not None:
                    self._fail(call, failed)
                    after = None
                else:
                    after = self._answer_with(call, value)
            except Exception as exc:  # a runtime bug must not leave the caller waiting forever
                log("internal error in call %d: %r" % (call_id, exc))
                after = None
                self._send_error(call, exc)
            self._after_reader_call(call, after)
            self._flush()
        elif self._outbox:
            self._outbox.append(parts)
            self._flush()
        else:
            self.channel.write(parts)
        return True

    def _run_local(self):
        """Run the sync calls read so far, in arrival order: on this (the reader) thread when
        their handler allows it and the sync thread is idle, else on the sync thread. Between
        two calls (in a run of quick ones, every _LOCAL_LOOK_SECONDS), whatever has arrived
        meanwhile is read first. Then the replies go out."""
        local = self._local
        pending = self._pending
        inline_ok = self._inline_ok
        clock = time.perf_counter
        looked = clock()
        while local:
            call, args = local.popleft()
            if call.handler.inline and inline_ok and self._sync_sent == self._sync_done:
                self._run_inline(call, args)
                # A look costs a system call: after a call that took a while, or once every
                # _LOCAL_LOOK_SECONDS through a run of quick ones (prefetch delivers many).
                if local:
                    now = clock()
                    if now - looked >= _LOCAL_LOOK_SECONDS:
                        looked = now
                        if pending():
                            self._read_pending()
            else:
                self._sync_sent += 1
                self._sync_queue.put((call, args))
        if self._outbox:
            self._flush()

    def _read_pending(self):
        """Read and dispatch the messages that can be read without waiting."""
        recv = self.channel.recv
        pending = self._pending
        while pending():
            try:
                msg = recv()
            except protocol.BadCall as exc:
                self._reject_call(exc.header, str(exc))
                continue
            if msg is None:
                _take_down_group("channel closed, exiting")
            self._dispatch(msg)

    def _run_inline(self, call, args):
        started = time.perf_counter()
        try:
            pending = self._run_sync(call, args)
        except Exception as exc:  # a runtime bug must not leave the caller waiting forever
            log("internal error in call %d: %r" % (call.id, exc))
            pending = None
            self._send_error(call, exc)
        took = time.perf_counter() - started
        if call.batch:
            took /= call.batch  # a batch reads the channel between its items: judge one item
        call.handler.judge_inline(took)
        self._after_reader_call(call, pending)

    def _after_reader_call(self, call, pending):
        """A call ran on the reader and returned ``pending`` (see ``_answer_with``): forget it
        once answered, or let the loop finish what it returned."""
        if pending is None:
            self._calls.pop(call.id, None)
        elif pending is not _HANDED_OFF:
            call.handler.inline = False  # it hands work to the loop: not a fast handler
            self._finish_on_loop(call, pending)

    def _finish_on_loop(self, call, awaitable):
        loop = self._ensure_loop()
        if call.ctx is not None:
            call.ctx._loop = loop
        call.uses_loop = True
        loop.call_soon_threadsafe(self._start_on_loop, call, None, awaitable)

    def _emit(self, parts):
        """Send an encoded message: on the reader thread into the outbox (written before the
        reader next waits), from any other thread at once."""
        if get_ident() == self._reader_ident:
            outbox = self._outbox
            outbox.append(parts)
            if len(outbox) >= _OUTBOX_MESSAGES:
                self._flush()
        else:
            self.channel.write(parts)

    def _send(self, header):
        self._emit(self.channel.encode(header))

    def _write_each(self, messages):
        for parts in messages:
            self.channel.write(parts)

    def _flush(self):
        if self._outbox:
            messages = self._outbox
            self._outbox = []
            self._write_many(messages)

    def _reject_call(self, header, message):
        """Answer a well-formed call whose arguments cannot be used; the worker goes on."""
        self._send({"type": "result", "id": header["id"], "error": {
            "type": "InvalidArguments", "message": message, "traceback": None}})

    def _on_cancel(self, msg):
        call = self._calls.get(_u64(msg, "id"))
        if call is None:
            return  # already answered, or never ours: the protocol says ignore
        # The flag first, uses_loop second: the sync thread sets uses_loop before the loop
        # checks the flag, so a call moving to the loop right now is caught by one or the other.
        call.cancel()
        if call.uses_loop:
            self._loop.call_soon_threadsafe(self._cancel_on_loop, call)
        else:
            self._wake_producer(call)  # a stream waiting for credit sees the cancel

    def _on_credit(self, msg):
        call = self._calls.get(_u64(msg, "id"))
        n = _u64(msg, "n")
        if call is None or call.granted is None:
            return  # the stream has ended meanwhile
        if call.uses_loop:
            self._loop.call_soon_threadsafe(self._credit_on_loop, call, n)
            return
        # Grant first, look for a waiting producer second (it sets _credit before it checks the
        # grant): one of the two always sees the other.
        call.granted += n
        self._wake_producer(call)

    @staticmethod
    def _wake_producer(call):
        cond = call._credit
        if cond is not None and not call.uses_loop:
            with cond:
                cond.notify()

    def _wait_credit(self, call):
        """Count one more stream item, first waiting for the pool's CREDIT if the window is used
        up (sync producers). False if the call was cancelled meanwhile."""
        if call.granted is not None and call.sent >= call.granted:
            cond = call._credit
            if cond is None:
                cond = call._credit = threading.Condition()
            with cond:
                while call.sent >= call.granted and not call.cancelled:
                    cond.wait()
            if call.cancelled:
                return False
        call.sent += 1
        return True

    def _credit_on_loop(self, call, n):
        call.granted += n
        if call._credit is not None:
            call._credit.set()

    async def _wait_credit_async(self, call):
        """Count one more stream item on the loop, first waiting for CREDIT if the window is used
        up. A cancel interrupts the wait like any other await in the handler's task."""
        if call.granted is not None:
            import asyncio  # loaded: we run on it

            while call.sent >= call.granted:
                if call._credit is None:
                    call._credit = asyncio.Event()
                call._credit.clear()
                await call._credit.wait()
        call.sent += 1

    def _on_shutdown(self):
        log("shutdown requested, exiting")
        # Running handlers are dropped, not awaited: os._exit does not join threads.
        self._flush()
        self.channel.send({"type": "goodbye"})
        _exit(EXIT_OK)

    # ---- sync calls (sync thread) ------------------------------------------------------

    def _sync_forever(self):
        get = self._sync_queue.get
        while True:
            call, args = get()
            try:
                pending = self._run_sync(call, args)
            except Exception as exc:  # a runtime bug must not leave the caller waiting forever
                log("internal error in call %d: %r" % (call.id, exc))
                pending = None
                try:
                    self._send_error(call, exc)
                except Exception as send_exc:  # this thread must live on for the next calls
                    log("cannot answer call %d: %r" % (call.id, send_exc))
            if pending is None:
                self._calls.pop(call.id, None)
            else:
                # A sync wrapper returned an awaitable: the loop finishes it (and answers).
                self._finish_on_loop(call, pending)
            self._sync_done += 1

    def _run_sync(self, call, args):
        """Run a sync handler and reply. Returns what ``_answer_with`` does."""
        if call.cancelled:  # cancelled while queued behind another sync call
            self._send_cancelled(call)
            return None
        if type(args) is _Stream:
            self._stream_sync(call, args.gen)
            return None
        if call.batch is not None:
            self._run_batch_sync(call, args)
            return None
        handler_ = call.handler
        try:
            if handler_.wants_ctx:
                pos, kw = handler_.bind(args, call.context())
                value = handler_.fn(*pos, **kw)
            else:
                kind = type(args)  # _apply, inline (a Python frame less per call)
                if kind is dict:
                    value = handler_.fn(**args)
                elif kind is list:
                    value = handler_.fn(*args)
                elif args is None:
                    value = handler_.fn()
                else:
                    value = handler_.fn(args)
        except BaseException as exc:
            self._fail(call, exc)
            return None
        if type(value) in _PLAIN_RESULTS:
            self._send_result(call, value)
            return None
        return self._answer_with(call, value)

    def _answer_with(self, call, value):
        """Answer a sync call whose handler returned ``value``: its result, or the stream it
        produces. Returns None once answered, an awaitable for the loop to finish (the caller
        hands it over), or _HANDED_OFF for a stream the sync thread now runs."""
        if isinstance(value, types.GeneratorType):
            if get_ident() == self._reader_ident:
                # A plain function that returned a generator: its stream must not wait for
                # credit on the reader (which alone can read it), so it runs on the sync thread,
                # and so do the handler's later calls.
                call.handler.inline = False
                self._sync_sent += 1
                self._sync_queue.put((call, _Stream(value)))
                return _HANDED_OFF
            self._stream_sync(call, value)
            return None
        if isinstance(value, (Awaitable, types.AsyncGeneratorType)):
            return value
        self._send_result(call, value)
        return None

    def _run_batch_sync(self, call, items):
        """Run a sync handler once per item of a batch call and answer with all the results.

        Items run in slices, each through a C-level ``map`` (a Python loop per item would cost
        as much as a small handler). Between slices the batch looks at the call's cancel flag
        and, on the reader thread, at most once a millisecond, reads whatever has arrived (a
        CANCEL, a PING); slices grow to take about a millisecond each. Results are not
        inspected here: a result that is not a plain value (a generator, say) is dealt with
        when the reply fails to encode."""
        on_reader = get_ident() == self._reader_ident
        pending = self._pending
        clock = time.perf_counter
        run = self._batch_runner(call, items)
        results = []
        errors = []
        remaining = iter(items)
        count = len(items)
        step = 1
        looked = clock()
        while len(results) < count:
            began = clock()
            # A look at the channel costs a system call: once per _BATCH_LOOK_SECONDS, not
            # per slice (the first slices are short, to learn how long an item takes).
            if on_reader and began - looked >= _BATCH_LOOK_SECONDS:
                looked = began
                if pending():
                    self._read_pending()
            if call.cancelled:
                self._send_cancelled(call)
                return
            done = len(results)
            if not self._run_slice(call, run, itertools.islice(remaining, step), results, errors):
                return  # answered already: the call was cancelled, or the worker is exiting
            per_item = (clock() - began) / max(1, len(results) - done)
            fits = int(_BATCH_LOOK_SECONDS / per_item) if per_item > 0 else _MAX_SLICE
            step = max(1, min(step * 8, fits, _MAX_SLICE))
        self._send_batch(call, results, errors)

    @staticmethod
    def _batch_runner(call, items):
        """A function that maps an iterator of the items' arguments to their results, through
        a C-level map for the argument shape the items share."""
        handler_ = call.handler
        fn = handler_.fn
        if handler_.wants_ctx:
            ctx = call.context()
            bind = handler_.bind
            return lambda it: map(lambda args: _apply_bound(fn, bind(args, ctx)), it)
        if call.scalars:  # the pool looked at every item already: no need to look again
            return lambda it: map(fn, it)
        kinds = set(map(type, items))
        kind = kinds.pop() if len(kinds) == 1 else object
        if kind is list:
            return lambda it: itertools.starmap(fn, it)
        if kind is dict:
            return lambda it: map(lambda kw: fn(**kw), it)
        if kind is object:  # arguments of several shapes
            return lambda it: map(lambda args: _apply(fn, args), it)
        if kind is type(None):
            return lambda it: map(lambda _: fn(), it)
        return lambda it: map(fn, it)  # one scalar argument each

    def _run_slice(self, call, run, it, results, errors):
        """Run the handler on each item ``it`` yields, appending results (None for a failed
        item) and errors. False if the call must end here (it has been answered)."""
        while True:
            try:
                results.extend(run(it))  # keeps the results before an item that raises
                return True
            except BaseException as exc:
                if isinstance(exc, SystemExit) or (isinstance(exc, Cancelled) and call.cancelled):
                    self._fail(call, exc)
                    return False
                errors.append({"index": len(results), "error": error_info(exc)})
                results.append(None)

    @staticmethod
    def _settle_item(value):
        """A batch item's result as a value: a stream is collected into a list, as a plain
        call's is by the pool."""
        if isinstance(value, types.GeneratorType):
            try:
                return list(value)
            finally:
                value.close()
        if isinstance(value, (Awaitable, types.AsyncGeneratorType)):
            if isinstance(value, types.CoroutineType):
                value.close()
            raise TypeError("the handler returned an awaitable, which a map cannot wait for "
                            "from a sync handler; declare the handler 'async def'")
        return value

    def _send_batch(self, call, results, errors):
        """Answer a batch call. An item whose result cannot be encoded fails alone."""
        if errors:
            errors.sort(key=_error_index)
        else:
            try:
                self._emit(self._encode_result(call.id, results))
                return
            except Exception:
                pass  # find the items at fault below
        encode = self.channel.encode
        header = {"type": "result", "id": call.id, "ok": results}
        if errors:
            header["errors"] = errors
        try:
            parts = encode(header)
        except FrameTooLarge as exc:
            exc.__traceback__ = None
            self._send_error(call, exc, "the results of a batch of %d items do not fit in one "
                                        "frame (%s); use a smaller chunksize" % (len(results), exc))
            return
        except Exception:
            failed = {e["index"] for e in errors}
            for index, value in enumerate(results):
                if index in failed:
                    continue
                if type(value) not in _PLAIN_RESULTS:
                    try:
                        # A stream becomes its list of items, as a plain call's does.
                        results[index] = value = self._settle_item(value)
                    except BaseException as exc:
                        if isinstance(exc, SystemExit):
                            self._fail(call, exc)
                            return
                        results[index] = None
                        errors.append({"index": index, "error": error_info(exc)})
                        continue
                try:
                    encode({"type": "chunk", "id": call.id, "seq": 0, "value": value})
                except Exception as exc:
                    exc.__traceback__ = None
                    results[index] = None
                    errors.append({"index": index, "error": error_info(
                        exc, "cannot send the result of %s(): %s" % (call.handler.name, exc))})
            errors.sort(key=_error_index)
            header["errors"] = errors
            self._send_encoded_or_error(call, header, "results")
            return
        self._emit(parts)

    def _stream_sync(self, call, gen):
        seq = 0
        try:
            while True:
                # Checked between items, so a cancelled stream stops at its next yield.
                if call.cancelled:
                    self._send_cancelled(call)
                    return
                try:
                    item = next(gen)
                except StopIteration:
                    break
                if not self._wait_credit(call):
                    self._send_cancelled(call)
                    return
                if not self._send_chunk(call, seq, item):
                    return
                seq += 1
            self._send_end(call)
        except BaseException as exc:
            self._fail(call, exc)
        finally:
            try:
                gen.close()
            except BaseException as exc:
                log("closing the stream of call %d raised %r" % (call.id, exc))

    # ---- calls on the loop (loop thread) -----------------------------------------------

    def _start_on_loop(self, call, args, obj):
        call.task = self._loop.create_task(self._run_async(call, args, obj))

    def _cancel_on_loop(self, call):
        if call.ctx is not None:
            call.ctx._wake_waiters()
        if call.on_loop:
            call.task.cancel()

    async def _run_async(self, call, args, obj):
        try:
            await self._run_on_loop(call, args, obj)
        except Exception as exc:  # a runtime bug must not leave the caller waiting forever
            log("internal error in call %d: %r" % (call.id, exc))
            self._send_error(call, exc)
        finally:
            self._calls.pop(call.id, None)

    async def _run_on_loop(self, call, args, obj):
        """Run an async handler, or finish the awaitable ``obj`` a sync one returned."""
        import asyncio  # loaded: this is a coroutine running on it

        if call.cancelled:  # the cancel came before the handler started
            if isinstance(obj, types.CoroutineType):
                obj.close()
            self._send_cancelled(call)
            return
        if call.batch is not None and obj is None:
            await self._run_batch_async(call, args)
            return
        agen = None
        call.on_loop = True
        try:
            if obj is None:
                ctx = call.context(self._loop) if call.handler.wants_ctx else None
                pos, kw = call.handler.bind(args, ctx)
                obj = call.handler.fn(*pos, **kw)
            if isinstance(obj, types.AsyncGeneratorType):
                agen = obj
                seq = 0
                async for item in agen:
                    await self._wait_credit_async(call)
                    if not self._send_chunk(call, seq, item):
                        break
                    seq += 1
                else:
                    call.on_loop = False
                    self._send_end(call)
            else:
                value = await obj
                call.on_loop = False
                self._send_result(call, value)
        except asyncio.CancelledError:
            call.on_loop = False
            if not call.cancelled:
                raise  # not the pool's cancel: the loop itself is going away
            self._send_cancelled(call)
        except BaseException as exc:
            call.on_loop = False
            self._fail(call, exc)
        finally:
            call.on_loop = False
            if agen is not None:
                try:
                    await agen.aclose()
                except BaseException as exc:
                    log("closing the stream of call %d raised %r" % (call.id, exc))

    async def _run_batch_async(self, call, items):
        """Run an async handler on every item of a batch call, at most max_in_flight at once,
        and answer with all the results."""
        import asyncio  # loaded: this is a coroutine running on it

        handler_ = call.handler
        ctx = call.context(self._loop) if handler_.wants_ctx else None
        results = [None] * len(items)
        errors = []
        limit = asyncio.Semaphore(self.max_in_flight)

        async def run_one(index, args):
            async with limit:
                try:
                    pos, kw = handler_.bind(args, ctx)
                    value = handler_.fn(*pos, **kw)
                    if isinstance(value, types.AsyncGeneratorType):
                        agen = value
                        try:
                            value = [item async for item in agen]
                        finally:
                            await agen.aclose()
                    elif isinstance(value, Awaitable):
                        value = await value
                    elif isinstance(value, types.GeneratorType):
                        value = self._settle_item(value)
                    results[index] = value
                except (asyncio.CancelledError, SystemExit):
                    raise
                except BaseException as exc:
                    if isinstance(exc, Cancelled) and call.cancelled:
                        raise
                    errors.append({"index": index, "error": error_info(exc)})

        call.on_loop = True
        try:
            await asyncio.gather(*[run_one(i, args) for i, args in enumerate(items)])
        except asyncio.CancelledError:
            call.on_loop = False
            if not call.cancelled:
                raise  # not the pool's cancel: the loop itself is going away
            self._send_cancelled(call)
            return
        except BaseException as exc:
            call.on_loop = False
            self._fail(call, exc)
            return
        call.on_loop = False
        self._send_batch(call, results, errors)

    # ---- replies (any thread) ----------------------------------------------------------

    def _fail(self, call, exc):
        """Answer a call whose handler raised."""
        if isinstance(exc, SystemExit):
            # sys.exit() in a handler means what it means anywhere: end the process.
            code = exc.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                log(str(code))
                code = 1
            _exit(code, "handler %r called sys.exit(%r), exiting" % (call.handler.name, exc.code))
        if isinstance(exc, Cancelled) and call.cancelled:
            self._send_cancelled(call)
        else:
            self._send_error(call, exc)

    def _send_error(self, call, exc, message=None):
        self._emit(self._encode_error(call.id, error_info(exc, message)))

    def _encode_error(self, call_id, error):
        try:
            return self.channel.encode({"type": "result", "id": call_id, "error": error})
        except FrameTooLarge:
            # A tiny max_frame: the error must still get through, so shed the traceback and
            # as much message as needed (4 bytes per char is the UTF-8 worst case).
            room = max(0, (self.channel.max_frame - 256) // 4)
            small = {"type": error["type"], "message": error["message"][:room], "traceback": None}
            return self.channel.encode({"type": "result", "id": call_id, "error": small})

    def _send_encoded_or_error(self, call, header, what):
        """Send ``header``, or if its value cannot be encoded, that failure as the call's error."""
        try:
            parts = self.channel.encode(header)
        except Exception as exc:
            exc.__traceback__ = None  # the encoder's frames say nothing useful to the caller
            parts = self._encode_error(call.id, error_info(
                exc, "cannot send the %s of %s(): %s" % (what, call.handler.name, exc)))
            self._emit(parts)
            return False
        self._emit(parts)
        return True

    def _send_result(self, call, value):
        try:
            parts = self._encode_result(call.id, value)
        except Exception:
            # The general path reports it as the call's error.
            self._send_encoded_or_error(
                call, {"type": "result", "id": call.id, "ok": value}, "result")
            return
        self._emit(parts)

    def _send_chunk(self, call, seq, value):
        return self._send_encoded_or_error(
            call, {"type": "chunk", "id": call.id, "seq": seq, "value": value}, "chunk %d" % seq)

    def _send_end(self, call):
        self._send({"type": "end", "id": call.id})

    def _send_cancelled(self, call):
        self._send({"type": "cancelled", "id": call.id})


# ============================================================================================
# Process plumbing: exit on SIGTERM and on parent death


def _take_down_group(reason):
    """End this worker and everything it started: the pool is gone or done with this worker.

    Used when the pool's process died (SIGHUP, the parent-death signal; a new parent) and when
    the pool closed the channel, which it does only once it no longer wants this worker or
    when it died (the end of the channel may even be seen before the death signal). Then nobody
    will kill what this worker started, so it does: a worker the pool spawned leads its own
    process group, and whatever a handler starts joins that group unless it leaves on purpose;
    killing the group takes the whole tree down at once, this process with it. A worker started
    by hand (a remote worker run from a shell) does not lead its group, which it shares with
    others, so it only exits.
    """
    log(reason)
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    except OSError:
        pass
    _exit(EXIT_OK)


def _install_signal_exits():
    """Exit promptly on SIGTERM, and take the process group down on SIGHUP, from any thread.

    The pool arms SIGHUP as this process's parent-death signal (PR_SET_PDEATHSIG on Linux): it
    arrives when the pool's process dies, even by SIGKILL, and then nothing this worker started
    may outlive it. SIGTERM is the pool asking this worker to stop; the pool kills what is left of
    the group itself once this process has exited.

    A Python signal handler only runs when the main thread executes bytecode, which may not
    happen soon while it sits in a blocking read. The C-level handler also writes the signal
    number to the wakeup fd from any thread, so a watcher thread reading it acts at once.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit(EXIT_OK, "SIGTERM, exiting"))
    hangup = getattr(signal, "SIGHUP", None)  # POSIX only
    if hangup is not None:
        signal.signal(hangup,
                      lambda signum, frame: _take_down_group("SIGHUP: the pool is gone, exiting"))
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        while True:
            data = os.read(read_fd, 64)
            if hangup is not None and hangup in data:
                _take_down_group("SIGHUP: the pool is gone, exiting")
            if not data or signal.SIGTERM in data:
                _exit(EXIT_OK, "SIGTERM, exiting")

    threading.Thread(target=watch, name="pypool-signals", daemon=True).start()


def _watch_parent(ppid):
    """Take the process group down when the process that started this worker is gone
    (re-parenting changes getppid).

    This backs up the parent-death signal, which fires when the spawning *thread* exits, does
    not exist off Linux, and may be overridden by an app's own SIGHUP handler. It cannot notice a
    parent that died before main() read getppid; the pool's pre-exec checks cover that window.
    """

    def watch():
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != ppid:
                _take_down_group("parent process %d went away, exiting" % ppid)

    threading.Thread(target=watch, name="pypool-parent-watch", daemon=True).start()


# ============================================================================================
# Start-up


_USAGE = ("usage: python -m pypool_worker --app APP [--transport {stdio,ipc,zmq}] "
          "[--max-in-flight N]\n"
          "       python -m pypool_worker --app APP --transport zmq --connect tcp://HOST:PORT "
          "--secret-file FILE [--workers N]")
_HELP = _USAGE + """

Serve @handler functions of an app module to a pypool pool.

options:
  -h, --help            show this help message and exit
  --app APP             module name (my.handlers) or path to a .py file defining handlers
  --transport {stdio,ipc,zmq}
                        stdio (default): frames on stdin/stdout; ipc: Unix socket at
                        $PYPOOL_IPC_PATH, authenticated with the secret on the
                        inherited descriptor $PYPOOL_SECRET_FD; zmq: a ZeroMQ DEALER
                        (needs pyzmq) connected to the pool's ROUTER
  --connect ENDPOINT    zmq: the pool to join, tcp://HOST:PORT (a remote worker) or
                        ipc://PATH; a pool that starts the worker itself sets it
  --secret-file FILE    zmq: file holding the pool's secret as hex text (remote workers)
  --workers N           zmq: start N worker processes (each in its own process group)
                        and end them all when one ends, so that the process manager that
                        started this command restarts the whole set
  --max-in-flight N     concurrent calls accepted (default: the app's PYPOOL_MAX_IN_FLIGHT,
                        else 1)
  --version             show program's version number and exit
"""
_TRANSPORTS = ("stdio", "ipc", "zmq")


class _Options:
    __slots__ = ("app", "transport", "max_in_flight", "connect", "secret_file", "workers")

    def __init__(self):
        self.app = None
        self.transport = "stdio"
        self.max_in_flight = None
        self.connect = None
        self.secret_file = None
        self.workers = None


def _parse_args(argv):
    """Parse the command line; bad options raise UsageError (a STARTUP_ERROR for the pool).

    Hand-written rather than argparse, which would add a few ms to every worker's start for
    three options; it accepts what argparse did: ``--opt value`` and ``--opt=value``.
    """
    opts = _Options()
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            sys.stdout.write(_HELP)
            sys.exit(0)
        if arg == "--version":
            sys.stdout.write("pypool_worker %s\n" % __version__)
            sys.exit(0)
        name, has_value, value = arg.partition("=")
        if name not in ("--app", "--transport", "--max-in-flight", "--connect", "--secret-file",
                        "--workers"):
            raise UsageError("unrecognized arguments: %s" % arg)
        if not has_value:
            value = next(args, None)
            if value is None:
                raise UsageError("argument %s: expected one argument" % name)
        if name == "--app":
            opts.app = value
        elif name == "--transport":
            if value not in _TRANSPORTS:
                raise UsageError("argument --transport: invalid choice: %r (choose from %s)"
                                 % (value, ", ".join(repr(t) for t in _TRANSPORTS)))
            opts.transport = value
        elif name == "--connect":
            opts.connect = value
        elif name == "--secret-file":
            opts.secret_file = value
        else:
            try:
                number = int(value)
            except ValueError:
                raise UsageError("argument %s: invalid int value: %r" % (name, value)) from None
            if name == "--workers":
                if number < 1:
                    raise UsageError("argument --workers: must be at least 1, got %d" % number)
                opts.workers = number
            else:
                opts.max_in_flight = number
    if opts.app is None:
        raise UsageError("the following arguments are required: --app")
    if opts.transport != "zmq":
        for given, flag in ((opts.connect, "--connect"), (opts.secret_file, "--secret-file"),
                            (opts.workers, "--workers")):
            if given is not None:
                raise UsageError("argument %s: only with --transport zmq" % flag)
    return opts


def _python_version():
    """The interpreter's version for HELLO, as platform.python_version() gives it (e.g.
    3.12.1 or 3.13.0rc2), without importing platform."""
    major, minor, micro, level, serial = sys.version_info[:5]
    version = "%d.%d.%d" % (major, minor, micro)
    if level != "final":
        version += "%s%d" % ({"alpha": "a", "beta": "b", "candidate": "rc"}.get(level, ""), serial)
    return version


def _transport_from_argv(argv):
    """Best guess at --transport when the options as a whole did not parse."""
    for i, arg in enumerate(argv):
        if arg == "--transport":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--transport="):
            return arg.split("=", 1)[1]
    return "stdio"


def load_app(target):
    """Import the app: a dotted module name, or a path to a .py file."""
    if target.endswith(".py") or os.sep in target or (os.altsep and os.altsep in target):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise UsageError("app file %s does not exist" % path)
        # Its directory goes on sys.path so the app can import its sibling modules.
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        name = os.path.splitext(os.path.basename(path))[0]
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so pickling and self-imports find the same module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    import importlib

    return importlib.import_module(target)


# Calls a worker accepts at once when every handler is async and neither the app
# (PYPOOL_MAX_IN_FLIGHT) nor --max-in-flight says: async handlers interleave on one event loop, so
# one call at a time would leave the worker idle at every await.
ASYNC_MAX_IN_FLIGHT = 16


def _max_in_flight(option, app, handlers=None):
    """Calls one worker accepts at once: --max-in-flight, else the app's PYPOOL_MAX_IN_FLIGHT,
    else ASYNC_MAX_IN_FLIGHT when every handler is async, else 1. The defaults are logged."""
    if option is not None:
        value, source = option, "--max-in-flight"
    elif hasattr(app, "PYPOOL_MAX_IN_FLIGHT"):
        value, source = app.PYPOOL_MAX_IN_FLIGHT, "PYPOOL_MAX_IN_FLIGHT"
    else:
        handlers = _HANDLERS if handlers is None else handlers
        asynchronous = [h.name for h in handlers.values() if h.on_loop]
        if asynchronous and len(asynchronous) == len(handlers):
            log("every handler is async: taking up to %d calls at once on the event loop "
                "(set PYPOOL_MAX_IN_FLIGHT in the app, or the pool's max_in_flight, to change it)"
                % ASYNC_MAX_IN_FLIGHT)
            return ASYNC_MAX_IN_FLIGHT
        if asynchronous:
            log("one call at a time: the app mixes sync and async handlers (async: %s); set "
                "PYPOOL_MAX_IN_FLIGHT in the app to run the async ones concurrently"
                % ", ".join(sorted(asynchronous)))
        return 1
    if type(value) is not int or value < 1:
        raise UsageError("%s must be an integer >= 1, got %r" % (source, value))
    return value


def _take_secret():
    """The pool's secret from the inherited pipe named by PYPOOL_SECRET_FD, or None.

    The pool hands secrets over on a pipe, never in the environment, because another process of
    the same user can read a process's environment for its whole life (/proc/<pid>/environ).
    """
    fd = os.environ.pop("PYPOOL_SECRET_FD", None)
    if fd is None:
        return None
    try:
        fd = int(fd)
        chunks = []
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            chunks.append(data)
        os.close(fd)
        return b"".join(chunks).decode("ascii").strip()
    except (ValueError, OSError) as exc:
        log("cannot read the secret from PYPOOL_SECRET_FD=%r: %s" % (fd, exc))
        return None


def _startup_failed(channel, exc):
    error = error_info(exc)
    log("startup failed: %s: %s" % (error["type"], error["message"]))
    if channel is not None:
        try:
            channel.send({"type": "startup_error", "error": error})
        except Exception as send_exc:
            log("could not send startup_error: %r" % (send_exc,))
    _exit(EXIT_STARTUP)


def main(argv=None):
    parent = os.getppid()  # first thing: the parent may die while we start up
    # Read and closed at once, before any app code could read or inherit it.
    secret = _take_secret()
    worker_id = os.environ.get("PYPOOL_WORKER_ID", "")
    _set_log_prefix(worker_id)
    try:
        faulthandler.enable()  # a crash in C code still leaves a Python traceback on stderr
    except (RuntimeError, ValueError, OSError):  # no usable stderr: nothing to write to anyway
        pass
    _install_signal_exits()
    _watch_parent(parent)

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = _parse_args(argv)
    except UsageError as exc:
        transport = _transport_from_argv(argv)
        channel = None
        try:
            channel = _open_channel(transport, secret)
        except Exception as open_exc:
            log("cannot report the bad options to the pool: %s" % (open_exc,))
        _startup_failed(channel, exc)

    if opts.workers is not None:
        from .zmq_workers import run_workers  # a supervisor, not a worker: no channel

        _exit(run_workers(argv, opts.workers, log, _EXIT_HOOKS))

    try:
        channel = _open_channel(opts.transport, secret, opts)
    except ProtocolError as exc:
        _exit(EXIT_PROTOCOL, "protocol error: %s" % exc)
    except Exception as exc:
        _exit(EXIT_STARTUP, "cannot open the %s channel: %s" % (opts.transport, exc))

    try:
        app = load_app(opts.app)
        if not _HANDLERS:
            raise UsageError("app %s registers no handlers (decorate functions with "
                             "@pypool_worker.handler)" % opts.app)
        max_in_flight = _max_in_flight(opts.max_in_flight, app)
    except BaseException as exc:  # SystemExit or KeyboardInterrupt at import are failures too
        _startup_failed(channel, exc)

    worker = Worker(channel, dict(_HANDLERS), max_in_flight, opts.app, worker_id)
    try:
        worker.handshake()
    except ProtocolError as exc:
        _exit(EXIT_PROTOCOL, "protocol error: %s" % exc)
    worker.serve_forever()
    return EXIT_OK
