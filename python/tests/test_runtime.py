"""Runtime pieces that need no worker process: handler introspection and option parsing."""

import contextlib
import functools
import inspect
import io
import sys
import unittest
import unittest.mock

import wire  # noqa: F401  (puts the package on sys.path)
from pypool_worker import runtime


def _via_inspect(fn):
    """What runtime._describe answered before its fast path: inspect's view of ``fn``."""
    on_loop = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = 0
    for p in params:
        if p.name == "ctx" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return on_loop, True, positional if p.kind == p.POSITIONAL_OR_KEYWORD else None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return on_loop, False, None


# Python 3.8 compatible source for the positional-only cases.
_POSONLY = {}
exec("def posonly_ctx(ctx, /, x): pass\n"
     "def posonly_then_ctx(a, /, b, ctx): pass\n", _POSONLY)


def plain(x, y): pass
def ctx_first(ctx, x): pass
def ctx_middle(a, ctx, b=1): pass
def ctx_kwonly(a, *, ctx): pass
def ctx_after_varargs(a, *rest, ctx=None): pass
def varkw(a, **ctx): pass
def local_named_ctx(a):
    ctx = a
    return ctx
async def coro(ctx): pass
async def agen(x):
    yield x
def gen(ctx):
    yield 1


class Callable:
    def __call__(self, a, ctx): pass

    def method(self, ctx): pass

    async def amethod(self): pass


@functools.wraps(coro)
def wrapped(*args, **kwargs):
    return coro(*args, **kwargs)


class DescribeTest(unittest.TestCase):
    def test_fast_path_agrees_with_inspect(self):
        fns = [plain, ctx_first, ctx_middle, ctx_kwonly, ctx_after_varargs, varkw,
               local_named_ctx, coro, agen, gen, lambda ctx: None, lambda a, b=2: None,
               _POSONLY["posonly_ctx"], _POSONLY["posonly_then_ctx"],
               # the slow path: not plain functions, or with attributes
               Callable(), Callable().method, Callable().amethod, wrapped,
               functools.partial(ctx_middle, 1), len, print]
        for fn in fns:
            with self.subTest(fn=fn):
                self.assertEqual(runtime._describe(fn), _via_inspect(fn))

    def test_coroutine_marked_function_is_async(self):
        mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
        if mark is None:
            self.skipTest("inspect.markcoroutinefunction needs Python 3.12")

        def marked(x): pass
        self.assertTrue(runtime._describe(mark(marked))[0])


class ParseArgsTest(unittest.TestCase):
    def test_forms(self):
        opts = runtime._parse_args(["--app", "a.py", "--transport=ipc", "--max-in-flight", "3"])
        self.assertEqual((opts.app, opts.transport, opts.max_in_flight), ("a.py", "ipc", 3))
        opts = runtime._parse_args(["--app=m.handlers"])
        self.assertEqual((opts.app, opts.transport, opts.max_in_flight),
                         ("m.handlers", "stdio", None))

    def test_zmq_options(self):
        opts = runtime._parse_args(["--app", "a", "--transport", "zmq", "--connect",
                                    "tcp://h:1", "--secret-file=/s", "--workers", "3"])
        self.assertEqual((opts.transport, opts.connect, opts.secret_file, opts.workers),
                         ("zmq", "tcp://h:1", "/s", 3))

    def test_errors(self):
        for argv in ([], ["--app"], ["--app", "a", "extra"], ["--bogus"], ["--ap", "a"],
                     ["--app", "a", "--transport", "carrier-pigeon"],
                     ["--app", "a", "--max-in-flight", "x"],
                     ["--app", "a", "--connect", "tcp://h:1"],
                     ["--app", "a", "--transport", "zmq", "--workers", "0"],
                     ["--app", "a", "--transport", "ipc", "--secret-file", "s"]):
            with self.subTest(argv=argv), self.assertRaises(runtime.UsageError):
                runtime._parse_args(argv)

    def test_help_and_version_exit_0(self):
        for flag, text in (("--help", "--max-in-flight N"), ("--version", "pypool_worker 0.1.0")):
            out = io.StringIO()
            with self.subTest(flag=flag), contextlib.redirect_stdout(out):
                with self.assertRaises(SystemExit) as cm:
                    runtime._parse_args([flag])
                self.assertEqual(cm.exception.code, 0)
            self.assertIn(text, out.getvalue())

    def test_python_version(self):
        self.assertTrue(runtime._python_version().startswith("%d.%d.%d" % sys.version_info[:3]))



def _channel(reads, written, at_end):
    """A channel whose reads bring ``reads`` one by one, then ``at_end()`` (0: the pool closed
    it), and whose writes are appended to ``written``, one message each."""

    def readinto(view):
        if not reads:
            return at_end()
        data = reads.pop(0)
        view[:len(data)] = data
        return len(data)

    def writev(parts):
        written.append(b"".join(bytes(p) for p in parts))
        return len(written[-1])

    return runtime._Channel(readinto, writev)


class _Down(KeyboardInterrupt):  # the one exception the reader's last resort re-raises
    pass


def _take_down(reason):
    """Stands in for the runtime's _take_down_group: ends the reader loop with _Down."""
    raise _Down(reason)


class ReaderLoopTest(unittest.TestCase):
    """The reader loop in one process, over a channel whose reads and writes the test makes."""

    def test_a_failed_read_is_the_pool_going_away_on_either_path(self):
        # The first read brings a lone call (the short path), the second one fails, as a socket
        # read does when the pool's end is reset.
        call = b"".join(bytes(p) for p in runtime.protocol.encode_frame(
            {"type": "call", "id": 1, "command": "echo_for_reader_test", "args": [5]}))
        written = []

        def reset():
            raise ConnectionResetError("connection reset by peer")

        handlers = {"echo_for_reader_test": runtime._Handler("echo_for_reader_test", lambda v: v)}
        worker = runtime.Worker(_channel([call], written, reset), handlers, 1)

        logged = []
        with unittest.mock.patch.object(runtime, "_take_down_group", _take_down), \
                unittest.mock.patch.object(runtime, "_exit", lambda code, reason=None: _take_down(
                    "exit %d: %s" % (code, reason))), \
                unittest.mock.patch.object(runtime, "log", logged.append):
            with self.assertRaises(_Down) as caught:
                worker._read_forever()
        self.assertEqual(str(caught.exception), "channel closed, exiting")
        self.assertTrue(any("connection reset" in line for line in logged), logged)
        self.assertEqual(len(written), 1)
        self.assertEqual(runtime.protocol.decode_body(written[0][4:]),
                         {"type": "result", "id": 1, "ok": 5})

    def test_a_handler_past_the_inline_budget_twice_in_a_row_leaves_the_reader(self):
        # The handler moves a fake clock on by the seconds it is given: no real waiting.
        now = [0.0]
        budget = runtime.INLINE_BUDGET_SECONDS

        def work(seconds):
            now[0] += seconds
            return seconds

        def run(durations):
            reads = [b"".join(bytes(p) for p in runtime.protocol.encode_frame(
                {"type": "call", "id": i + 1, "command": "work", "args": [d]}))
                for i, d in enumerate(durations)]
            written = []
            handler_ = runtime._Handler("work", work)
            worker = runtime.Worker(_channel(reads, written, lambda: 0), {"work": handler_}, 1)
            with unittest.mock.patch.object(runtime, "_take_down_group", _take_down), \
                    unittest.mock.patch.object(runtime.time, "perf_counter", lambda: now[0]):
                with self.assertRaises(_Down):
                    worker._read_forever()
            # Every call ran on the reader (there is no sync thread here) and was answered.
            self.assertEqual([runtime.protocol.decode_body(w[4:])["id"] for w in written],
                             list(range(1, len(durations) + 1)))
            return handler_.inline

        slow, fast = 2 * budget, budget / 10
        self.assertTrue(run([fast, fast]))
        self.assertTrue(run([slow]))  # once may be the machine, not the handler
        self.assertTrue(run([slow, fast, slow]))  # not in a row
        self.assertFalse(run([fast, slow, slow]))


if __name__ == "__main__":
    unittest.main()
