"""Test helpers: run a real worker process and speak the protocol to it, as the pool would."""

import os
import queue
import subprocess
import sys
import tempfile
import threading

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(TESTS_DIR)  # holds the pypool_worker package
REPO_DIR = os.path.dirname(PYTHON_DIR)
APPS_DIR = os.path.join(TESTS_DIR, "apps")
E2E_APP = os.path.join(APPS_DIR, "e2e_app.py")
TESTKIT_APPS_DIR = os.path.join(REPO_DIR, "pool-testkit", "apps")
EXAMPLES_DIR = os.path.join(REPO_DIR, "examples")

if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)

from pypool_worker import protocol  # noqa: E402

# Long enough for a loaded CI machine; a passing test never waits this long.
TIMEOUT = 15.0


def worker_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                      else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYPOOL_WORKER_ID"] = "w-test"
    env.pop("PYPOOL_SECRET_FD", None)
    if extra:
        env.update(extra)
    return env


def frame_bytes(header, codec=protocol.JSON):
    return b"".join(bytes(p) for p in protocol.encode_frame(header, codec))


class _EOF:
    def __repr__(self):
        return "EOF"


EOF = _EOF()


class FrameReader:
    """Reads frames on a thread so tests can wait for the next one with a timeout."""

    def __init__(self, readinto):
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(readinto,), daemon=True)
        self._thread.start()

    def _run(self, readinto):
        try:
            while True:
                body = protocol.read_frame(readinto)
                if body is None:
                    break
                self._queue.put(protocol.decode_body(body))
        except Exception as exc:  # surfaced by recv() as a test failure
            self._queue.put(exc)
        self._queue.put(EOF)

    def recv(self, timeout=TIMEOUT):
        """The next message, or EOF once the worker closed its end."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no frame from the worker within %.0f s" % timeout) from None
        if isinstance(item, Exception):
            raise AssertionError("worker sent an undecodable frame: %r" % (item,))
        if item is EOF:
            self._queue.put(EOF)  # stay at EOF for later calls
        return item

    def join(self, timeout=TIMEOUT):
        self._thread.join(timeout)


class WorkerProcess:
    """A ``python -m pypool_worker`` child on pipes; killed and reaped by the test's cleanup."""

    def __init__(self, testcase, app=E2E_APP, args=(), env=None, python=None):
        self.stderr_file = tempfile.TemporaryFile()
        cmd = [python or sys.executable, "-m", "pypool_worker", "--app", app] + list(args)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr_file, env=worker_env(env), bufsize=0,
                                     cwd=TESTS_DIR)
        testcase.addCleanup(self.close)
        self.reader = FrameReader(self.proc.stdout.readinto)
        self.codec = protocol.JSON

    # ---- sending

    def send(self, header):
        self.send_raw(frame_bytes(header, self.codec))

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self):
        self.proc.stdin.close()

    # ---- receiving

    def recv(self, timeout=TIMEOUT):
        return self.reader.recv(timeout)

    def handshake(self, codec=protocol.JSON, max_frame=protocol.DEFAULT_MAX_FRAME):
        hello = self.recv()
        assert hello is not EOF, "worker exited before HELLO: %s" % self.stderr()
        assert hello["type"] == "hello", hello
        self.send({"type": "welcome", "codec": codec, "pool": "test", "worker_id": "w-test",
                   "max_frame": max_frame})
        self.codec = codec
        return hello

    def call(self, call_id, command, args=None, **fields):
        header = {"type": "call", "id": call_id, "command": command, "args": args}
        header.update(fields)
        self.send(header)

    def result(self, call_id, command, args=None, **fields):
        """Call and return the single reply."""
        self.call(call_id, command, args, **fields)
        reply = self.recv()
        assert reply is not EOF, "worker exited: %s" % self.stderr()
        assert reply.get("id") == call_id, reply
        return reply

    def ok(self, call_id, command, args=None, **fields):
        reply = self.result(call_id, command, args, **fields)
        assert reply["type"] == "result" and "ok" in reply, reply
        return reply["ok"]

    # ---- process

    def wait(self, timeout=TIMEOUT):
        return self.proc.wait(timeout)

    def stderr(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join()  # sees EOF now that the worker is gone
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.stderr_file.close()
