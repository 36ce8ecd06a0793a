"""The pypool worker process: handshake, call dispatch, cancellation, sessions and shutdown.

Threads and why:

* the main thread runs one asyncio loop. Every message from the pool is dispatched there, and
  ``async def`` handlers run there as tasks, so pings and cancels are answered even while
  handlers are busy;
* a reader thread does blocking frame reads and decodes them, handing messages to the loop;
* one executor thread runs sync handlers one at a time, so a sync handler never blocks the loop;
* small watcher threads make the process exit on SIGTERM and when its parent goes away.

Replies are written by whichever thread produced them; a lock keeps frames whole. Every way out
of the process is ``os._exit``: the pool wants a prompt exit, not a wait for handler threads.
"""

import argparse
import asyncio
import faulthandler
import hashlib
import hmac
import importlib
import importlib.util
import inspect
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor

from . import __version__
from . import protocol
from .protocol import FrameTooLarge, ProtocolError

EXIT_OK = 0
EXIT_STARTUP = 2
EXIT_PROTOCOL = 3

FEATURES = ["stream", "cancel", "async", "session_state"]
PARENT_POLL_SECONDS = 0.5
# Error texts are capped so that one huge message cannot make the error itself unsendable.
_MAX_ERROR_TEXT = 1 << 20

_THIS_FILE = __file__


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


class _Handler:
    """A registered function plus what the runtime needs to know to call it."""

    __slots__ = ("name", "fn", "on_loop", "wants_ctx", "ctx_index")

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn
        # Coroutine and async-generator functions run on the loop. Anything else runs on the
        # executor thread; if it turns out to return an awaitable (a sync wrapper around an
        # async function), the loop finishes it.
        self.on_loop = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        self.wants_ctx = False
        self.ctx_index = None  # position of `ctx` among positional parameters, if it has one
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # some builtins have no signature: no ctx for them
            params = []
        positional = 0
        for p in params:
            if p.name == "ctx" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                self.wants_ctx = True
                if p.kind == p.POSITIONAL_OR_KEYWORD:
                    self.ctx_index = positional
                break
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                positional += 1

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


def handler(name_or_fn=None, name=None):
    """Register a function as a command: ``@handler``, ``@handler("name")`` or ``@handler(name=...)``.

    The function is returned unchanged, so it stays callable from ordinary code and tests.
    """
    if callable(name_or_fn) and not isinstance(name_or_fn, str):
        return _register(name_or_fn, name)
    if name_or_fn is not None and not isinstance(name_or_fn, str):
        raise TypeError("@handler takes a function or a command name, not %r" % (name_or_fn,))
    if name_or_fn is not None and name is not None:
        raise TypeError("@handler got two names: %r and %r" % (name_or_fn, name))
    chosen = name_or_fn if name_or_fn is not None else name

    def decorate(fn):
        return _register(fn, chosen)

    return decorate


def _register(fn, name):
    if not callable(fn):
        raise TypeError("@handler needs a callable, not %r" % (fn,))
    if name is None:
        name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name:
        raise ValueError("a handler needs a non-empty command name")
    _HANDLERS[name] = _Handler(name, fn)
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
                 "_flag", "_event", "_loop")

    def __init__(self, call_id=0, session_id=None, session=None, deadline=None, command="",
                 _loop=None):
        self.call_id = call_id
        self.command = command
        self.session_id = session_id
        self.session = {} if session is None else session
        self.deadline = deadline
        # A threading.Event because sync handlers read the flag from the executor thread.
        self._flag = threading.Event()
        self._event = None  # asyncio.Event for wait_cancelled(), made on first use
        self._loop = _loop

    @property
    def cancelled(self):
        """True once the pool has cancelled this call."""
        return self._flag.is_set()

    def check_cancelled(self):
        """Raise Cancelled if the pool has cancelled this call (for sync handlers' loops)."""
        if self._flag.is_set():
            raise Cancelled("call %s was cancelled" % (self.call_id,))

    def time_left(self):
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    async def wait_cancelled(self):
        """Return once the pool has cancelled this call."""
        if self._flag.is_set():
            return
        if asyncio.get_running_loop() is self._loop:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        else:
            # Another event loop (e.g. asyncio.run inside a sync handler) cannot be woken
            # safely from the worker's loop, so it polls the thread-safe flag instead.
            while not self._flag.is_set():
                await asyncio.sleep(0.05)

    def _set_cancelled(self):
        # Called on the worker loop's thread.
        self._flag.set()
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


def _exit(code, reason=None):
    if reason:
        log(reason)
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
    if len(text) > _MAX_ERROR_TEXT:
        return text[:_MAX_ERROR_TEXT] + "\n... (truncated)"
    return text


def error_info(exc, message=None):
    """The protocol's structured error for an exception."""
    if message is None:
        try:
            message = str(exc)
        except Exception:
            message = "<unprintable %s>" % type(exc).__qualname__
    try:
        tb_text = "".join(traceback.format_exception(type(exc), exc, _user_traceback(exc)))
    except Exception:
        tb_text = None
    return {"type": _type_name(type(exc)), "message": _cap(message),
            "traceback": None if tb_text is None else _cap(tb_text)}


# ============================================================================================
# Channel: one framed duplex stream


class _Channel:
    """Frames over a byte stream: thread-safe whole-frame writes, blocking reads."""

    def __init__(self, readinto, writev):
        self._readinto = readinto
        self._writev = writev
        self._lock = threading.Lock()
        self.codec = protocol.JSON  # until WELCOME says otherwise
        self.max_frame = protocol.DEFAULT_MAX_FRAME

    def encode(self, header):
        return protocol.encode_frame(header, self.codec, self.max_frame)

    def write(self, parts):
        try:
            with self._lock:
                protocol.write_all(self._writev, parts)
        except OSError as exc:
            # The pool closed its end: nobody is left to answer, which is the EOF case.
            _exit(EXIT_OK, "channel closed while writing (%s), exiting" % exc)

    def send(self, header):
        self.write(self.encode(header))

    def recv(self):
        """The next message, or None once the pool has closed the channel."""
        try:
            body = protocol.read_frame(self._readinto, self.max_frame)
        except ProtocolError:
            raise
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
    return _Channel(lambda view: os.readv(frames_in, [view]),
                    lambda bufs: os.writev(frames_out, bufs))


def _open_ipc(secret):
    _protect_stdout()
    path = os.environ.get("PYPOOL_IPC_PATH")
    if not path:
        raise UsageError("--transport ipc needs PYPOOL_IPC_PATH in the environment")
    if secret is None:
        raise UsageError("--transport ipc needs PYPOOL_SECRET in the environment")
    try:
        key = bytes.fromhex(secret)
    except ValueError:
        raise UsageError("PYPOOL_SECRET is not a hex string") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    channel = _Channel(sock.recv_into, sock.sendmsg)
    challenge = channel.recv()
    if challenge is None:
        _exit(EXIT_OK, "channel closed before the challenge, exiting")
    nonce = challenge.get("nonce")
    if challenge["type"] != "challenge" or not isinstance(nonce, str):
        raise ProtocolError("expected a challenge with a string nonce, got %r" % challenge["type"])
    mac = hmac.new(key, nonce.encode("utf-8"), hashlib.sha256).hexdigest()
    channel.send({"type": "auth", "mac": mac})
    return channel


def _open_channel(transport, secret):
    if transport == "stdio":
        return _open_stdio()
    if transport == "ipc":
        return _open_ipc(secret)
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
    __slots__ = ("id", "handler", "ctx", "task", "on_loop")

    def __init__(self, call_id, handler_, ctx):
        self.id = call_id
        self.handler = handler_
        self.ctx = ctx
        self.task = None
        # True exactly while the call's task is suspended inside handler code on the loop,
        # i.e. while task.cancel() would interrupt the handler and nothing else.
        self.on_loop = False


class Worker:
    def __init__(self, channel, handlers, max_in_flight, app_name="", worker_id=""):
        self.channel = channel
        self.handlers = handlers
        self.max_in_flight = max_in_flight
        self.app_name = app_name
        self.worker_id = worker_id
        self._calls = {}  # id -> _Call; touched only on the loop thread
        self._sessions = {}  # session id -> dict; touched only on the loop thread
        self._loop = None
        self._executor = None

    # ---- handshake ---------------------------------------------------------------------

    def handshake(self):
        self.channel.send({
            "type": "hello",
            "protocol": protocol.PROTOCOL_VERSION,
            "runtime": "pypool_worker/%s" % __version__,
            "python": platform.python_version(),
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

    # ---- main loop ---------------------------------------------------------------------

    def serve_forever(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pypool-sync")
        threading.Thread(target=self._read_forever, name="pypool-reader", daemon=True).start()
        self._loop.run_forever()

    def _read_forever(self):
        try:
            while True:
                msg = self.channel.recv()
                if msg is None:
                    _exit(EXIT_OK, "channel closed, exiting")
                self._loop.call_soon_threadsafe(self._dispatch, msg)
        except ProtocolError as exc:
            _exit(EXIT_PROTOCOL, "protocol error: %s" % exc)
        except BaseException as exc:  # a bug here would leave a worker that never answers
            _exit(EXIT_PROTOCOL, "reader thread failed: %r" % (exc,))

    def _dispatch(self, msg):
        kind = msg["type"]
        try:
            if kind == "call":
                self._on_call(msg)
            elif kind == "cancel":
                self._on_cancel(msg)
            elif kind == "ping":
                self.channel.send({"type": "pong", "id": _u64(msg, "id")})
            elif kind == "session_end":
                self._sessions.pop(_str(msg, "session"), None)
            elif kind == "shutdown":
                self._on_shutdown()
            else:
                # Not ours to answer; a newer pool may send types this runtime predates.
                log("ignoring unexpected %r message" % kind)
        except ProtocolError as exc:
            _exit(EXIT_PROTOCOL, "protocol error: %s" % exc)

    def _on_call(self, msg):
        call_id = _u64(msg, "id")
        command = _str(msg, "command")
        session_id = _opt_str(msg, "session")
        timeout_ms = _opt_u64(msg, "timeout_ms")
        if call_id in self._calls:
            raise ProtocolError("call id %d is already running" % call_id)
        handler_ = self.handlers.get(command)
        if handler_ is None:
            self.channel.send({"type": "result", "id": call_id, "error": {
                "type": "UnknownCommand",
                "message": "unknown command %r; known commands: %s"
                           % (command, ", ".join(sorted(self.handlers))),
                "traceback": None,
            }})
            return
        session = self._sessions.setdefault(session_id, {}) if session_id is not None else {}
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        ctx = Context(call_id, session_id, session, deadline, command, _loop=self._loop)
        call = _Call(call_id, handler_, ctx)
        self._calls[call_id] = call
        call.task = self._loop.create_task(self._run_call(call, msg.get("args")))

    def _on_cancel(self, msg):
        call = self._calls.get(_u64(msg, "id"))
        if call is None:
            return  # already answered, or never ours: the protocol says ignore
        call.ctx._set_cancelled()
        if call.on_loop:
            call.task.cancel()

    def _on_shutdown(self):
        log("shutdown requested, exiting")
        # Running sync handlers are dropped, not awaited: os._exit does not join threads.
        self.channel.send({"type": "goodbye"})
        _exit(EXIT_OK)

    # ---- running calls -----------------------------------------------------------------

    async def _run_call(self, call, args):
        try:
            if call.handler.on_loop:
                await self._run_on_loop(call, args, None)
            else:
                pending = await self._loop.run_in_executor(
                    self._executor, self._run_sync, call, args)
                if pending is not None:
                    await self._run_on_loop(call, None, pending)
        except Exception as exc:  # a runtime bug must not leave the caller waiting forever
            log("internal error in call %d: %r" % (call.id, exc))
            self._send_error(call, exc)
        finally:
            self._calls.pop(call.id, None)

    async def _run_on_loop(self, call, args, obj):
        """Run an async handler (or finish the awaitable a sync one returned) on the loop."""
        ctx = call.ctx
        if ctx.cancelled:  # the cancel came before the handler started
            if inspect.iscoroutine(obj):
                obj.close()
            self._send_cancelled(call)
            return
        agen = None
        call.on_loop = True
        try:
            if obj is None:
                pos, kw = call.handler.bind(args, ctx)
                obj = call.handler.fn(*pos, **kw)
            if inspect.isasyncgen(obj):
                agen = obj
                seq = 0
                async for item in agen:
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
            if not ctx.cancelled:
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

    def _run_sync(self, call, args):
        """Executor thread: run a sync handler and reply. Returns an awaitable for the loop to
        finish if the handler returned one, else None (already answered)."""
        ctx = call.ctx
        if ctx.cancelled:  # cancelled while queued behind another sync call
            self._send_cancelled(call)
            return None
        try:
            pos, kw = call.handler.bind(args, ctx)
            value = call.handler.fn(*pos, **kw)
        except BaseException as exc:
            self._fail(call, exc)
            return None
        if isinstance(value, types.GeneratorType):
            self._stream_sync(call, value)
            return None
        if inspect.isawaitable(value) or inspect.isasyncgen(value):
            return value
        self._send_result(call, value)
        return None

    def _stream_sync(self, call, gen):
        ctx = call.ctx
        seq = 0
        try:
            while True:
                # Checked between items, so a cancelled stream stops at its next yield.
                if ctx.cancelled:
                    self._send_cancelled(call)
                    return
                try:
                    item = next(gen)
                except StopIteration:
                    break
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
        if isinstance(exc, Cancelled) and call.ctx.cancelled:
            self._send_cancelled(call)
        else:
            self._send_error(call, exc)

    # ---- replies (any thread) ----------------------------------------------------------

    def _send_error(self, call, exc, message=None):
        self.channel.write(self._encode_error(call.id, error_info(exc, message)))

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
            self.channel.write(parts)
            return False
        self.channel.write(parts)
        return True

    def _send_result(self, call, value):
        self._send_encoded_or_error(call, {"type": "result", "id": call.id, "ok": value}, "result")

    def _send_chunk(self, call, seq, value):
        return self._send_encoded_or_error(
            call, {"type": "chunk", "id": call.id, "seq": seq, "value": value}, "chunk %d" % seq)

    def _send_end(self, call):
        self.channel.send({"type": "end", "id": call.id})

    def _send_cancelled(self, call):
        self.channel.send({"type": "cancelled", "id": call.id})


# ============================================================================================
# Process plumbing: exit on SIGTERM and on parent death


def _install_sigterm_exit():
    """Exit 0 promptly on SIGTERM, whatever thread the kernel delivers it to.

    A Python signal handler only runs when the main thread executes bytecode, which may not
    happen soon while it sits in a blocking read. The C-level handler also writes the signal
    number to the wakeup fd from any thread, so a watcher thread reading it exits at once.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit(EXIT_OK, "SIGTERM, exiting"))
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        while True:
            data = os.read(read_fd, 64)
            if not data or signal.SIGTERM in data:
                _exit(EXIT_OK, "SIGTERM, exiting")

    threading.Thread(target=watch, name="pypool-signals", daemon=True).start()


def _watch_parent(ppid):
    """Exit when the process that started this worker is gone (re-parenting changes getppid).

    This backs up PR_SET_PDEATHSIG on the pool side, which fires when the spawning *thread*
    exits and does not exist off Linux. It cannot notice a parent that died before main() read
    getppid; the pool's pre-exec checks cover that window.
    """

    def watch():
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != ppid:
                _exit(EXIT_OK, "parent process %d went away, exiting" % ppid)

    threading.Thread(target=watch, name="pypool-parent-watch", daemon=True).start()


# ============================================================================================
# Start-up


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # Bad options become a STARTUP_ERROR for the pool instead of argparse's exit(2).
        raise UsageError(message)


def _parser():
    parser = _ArgumentParser(
        prog="python -m pypool_worker", allow_abbrev=False,
        description="Serve @handler functions of an app module to a pypool pool.")
    parser.add_argument("--app", required=True,
                        help="module name (my.handlers) or path to a .py file defining handlers")
    parser.add_argument("--transport", choices=["stdio", "ipc"], default="stdio",
                        help="stdio (default): frames on stdin/stdout; ipc: Unix socket at "
                             "$PYPOOL_IPC_PATH, authenticated with $PYPOOL_SECRET")
    parser.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                        help="concurrent calls accepted (default: the app's "
                             "PYPOOL_MAX_IN_FLIGHT, else 1)")
    parser.add_argument("--version", action="version", version="pypool_worker " + __version__)
    return parser


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
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so pickling and self-imports find the same module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    return importlib.import_module(target)


def _max_in_flight(option, app):
    if option is not None:
        value, source = option, "--max-in-flight"
    else:
        value, source = getattr(app, "PYPOOL_MAX_IN_FLIGHT", 1), "PYPOOL_MAX_IN_FLIGHT"
    if type(value) is not int or value < 1:
        raise UsageError("%s must be an integer >= 1, got %r" % (source, value))
    return value


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
    # Out of the environment at once, before any app code could read or inherit it.
    secret = os.environ.pop("PYPOOL_SECRET", None)
    worker_id = os.environ.get("PYPOOL_WORKER_ID", "")
    _set_log_prefix(worker_id)
    try:
        faulthandler.enable()  # a crash in C code still leaves a Python traceback on stderr
    except (RuntimeError, ValueError, OSError):  # no usable stderr: nothing to write to anyway
        pass
    _install_sigterm_exit()
    _watch_parent(parent)

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = _parser().parse_args(argv)
    except UsageError as exc:
        transport = _transport_from_argv(argv)
        channel = None
        try:
            channel = _open_channel(transport, secret)
        except Exception as open_exc:
            log("cannot report the bad options to the pool: %s" % (open_exc,))
        _startup_failed(channel, exc)

    try:
        channel = _open_channel(opts.transport, secret)
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
