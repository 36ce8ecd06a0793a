"""End-to-end: a real ``python -m pypool_worker`` process, spoken to over pipes like the pool does."""

import ctypes
import hashlib
import hmac
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import unittest

import wire
from wire import EOF, TIMEOUT, WorkerProcess
from pypool_worker import protocol

try:
    import msgpack
except ImportError:
    msgpack = None


class HandshakeTest(unittest.TestCase):
    def test_hello_fields(self):
        w = WorkerProcess(self)
        hello = w.handshake()
        self.assertEqual(hello["protocol"], 2)
        self.assertEqual(hello["runtime"], "pypool_worker/0.1.0")
        self.assertEqual(hello["python"], "%d.%d.%d" % sys.version_info[:3])
        self.assertEqual(hello["pid"], w.proc.pid)
        self.assertEqual(hello["worker_id"], "w-test")
        self.assertIn("json", hello["codecs"])
        self.assertEqual("msgpack" in hello["codecs"], msgpack is not None)
        self.assertIn("echo", hello["commands"])
        self.assertIn("renamed", hello["commands"])
        self.assertNotIn("some_function_name", hello["commands"])
        self.assertEqual(hello["max_in_flight"], 4)  # PYPOOL_MAX_IN_FLIGHT in the app
        self.assertEqual(sorted(hello["features"]),
                         ["async", "batch", "cancel", "flow", "session_state", "stream"])
        w.ok(1, "echo", [1])  # the "ready" line is logged after WELCOME, before any call runs
        self.assertIn("pypool_worker[w-test] ready", w.stderr())

    def test_max_in_flight_option_overrides_the_app(self):
        w = WorkerProcess(self, args=["--max-in-flight", "2"])
        self.assertEqual(w.handshake()["max_in_flight"], 2)

    def test_app_by_module_name(self):
        w = WorkerProcess(self, app="apps.e2e_app")  # cwd is the tests directory
        self.assertIn("echo", w.handshake()["commands"])
        self.assertEqual(w.ok(1, "add", [2, 3]), 5)


class CallTest(unittest.TestCase):
    def setUp(self):
        self.w = WorkerProcess(self)
        self.w.handshake()

    def test_echo_with_bytes(self):
        value = {"data": bytes(range(256)) * 1000, "nested": [b"", b"\x00", {"k": b"v"}],
                 "text": "ünïcode", "n": 1.25}
        self.assertEqual(self.w.ok(1, "echo", {"value": value}), value)

    def test_argument_shapes(self):
        self.assertEqual(self.w.ok(1, "add", {"a": 1, "b": 2}), 3)
        self.assertEqual(self.w.ok(2, "add", [1, 2]), 3)
        self.assertEqual(self.w.ok(3, "echo", "scalar"), "scalar")
        self.assertEqual(self.w.ok(4, "renamed", None), "renamed")
        self.assertEqual(self.w.ok(5, "describe", [1, 2, 3, 4]),
                         {"a": 1, "b": 2, "rest": [3, 4], "extra": {}})
        self.assertEqual(self.w.ok(6, "describe", {"a": 1, "z": 9}),
                         {"a": 1, "b": 2, "rest": [], "extra": {"z": 9}})
        self.assertEqual(self.w.ok(7, "first_ctx", [5]), [7, 5])
        self.assertEqual(self.w.ok(8, "first_ctx", {"x": 5}), [8, 5])

    def test_wrong_arguments_are_a_type_error(self):
        reply = self.w.result(1, "add", [1])
        self.assertEqual(reply["error"]["type"], "TypeError")
        self.assertIn("b", reply["error"]["message"])
        reply = self.w.result(2, "recall", {"key": "k", "ctx": 1})
        self.assertEqual(reply["error"]["type"], "TypeError")
        self.assertEqual(self.w.ok(3, "add", [1, 1]), 2)

    def test_exception_becomes_structured_error_and_worker_lives_on(self):
        reply = self.w.result(1, "fail", ["boom"])
        self.assertEqual(reply["type"], "result")
        self.assertNotIn("ok", reply)
        error = reply["error"]
        self.assertEqual(error["type"], "ValueError")
        self.assertEqual(error["message"], "boom")
        self.assertIn('e2e_app.py", line', error["traceback"])
        self.assertIn("in fail", error["traceback"])
        self.assertNotIn("runtime.py", error["traceback"])
        self.assertEqual(self.w.result(2, "app_error")["error"]["type"], "e2e_app.AppError")
        self.assertEqual(self.w.ok(3, "echo", [1]), 1)

    def test_unknown_command(self):
        error = self.w.result(1, "no_such_command")["error"]
        self.assertEqual(error["type"], "UnknownCommand")
        self.assertIn("no_such_command", error["message"])
        self.assertIn("echo", error["message"])
        self.assertIn("stream", error["message"])
        self.assertEqual(self.w.ok(2, "echo", [2]), 2)

    def test_unencodable_results_become_errors(self):
        error = self.w.result(1, "unencodable")["error"]
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("not JSON serializable", error["message"])
        self.assertEqual(self.w.result(2, "not_a_number")["error"]["type"], "ValueError")
        self.assertEqual(self.w.ok(3, "echo", [3]), 3)

    def test_stray_output_does_not_corrupt_the_stream(self):
        self.assertEqual(self.w.ok(1, "noisy", [{"v": b"\xff"}]), {"v": b"\xff"})
        self.assertEqual(self.w.ok(2, "echo", ["after"]), "after")
        self.assertEqual(self.w.ok(3, "read_stdin"), "")  # stdin is not the frame pipe
        self.w.send({"type": "shutdown"})
        self.assertEqual(self.w.recv()["type"], "goodbye")
        self.assertEqual(self.w.wait(), 0)
        err = self.w.stderr()
        for noise in ("noise from print", "garbage from os.write", "noise from sys.stdout"):
            self.assertIn(noise, err)

    def test_generator_streams_chunks_then_end(self):
        self.w.call(1, "stream", [5])
        replies = [self.w.recv() for _ in range(6)]
        self.assertEqual([r["type"] for r in replies], ["chunk"] * 5 + ["end"])
        self.assertEqual([r["seq"] for r in replies[:5]], list(range(5)))
        self.assertEqual([r["value"] for r in replies[:5]], list(range(5)))
        self.assertTrue(all(r["id"] == 1 for r in replies))
        self.assertEqual(self.w.result(2, "stream", [0])["type"], "end")

    def test_async_generator_streams_with_bytes(self):
        self.w.call(1, "astream", [3])
        replies = [self.w.recv() for _ in range(4)]
        self.assertEqual([r["type"] for r in replies], ["chunk"] * 3 + ["end"])
        self.assertEqual([r["value"] for r in replies[:3]],
                         [{"i": i, "b": bytes([i])} for i in range(3)])

    def test_stream_failing_part_way_ends_with_error(self):
        self.w.call(1, "stream_fails", [2])
        replies = [self.w.recv() for _ in range(3)]
        self.assertEqual([r["type"] for r in replies], ["chunk", "chunk", "result"])
        self.assertEqual(replies[2]["error"]["type"], "RuntimeError")

    def test_session_state(self):
        self.assertIsNone(self.w.ok(1, "remember", {"key": "k", "value": b"v1"}, session="s1"))
        self.assertIsNone(self.w.ok(2, "remember", {"key": "k", "value": "v2"}, session="s2"))
        self.assertEqual(self.w.ok(3, "recall", {"key": "k"}, session="s1"), b"v1")
        self.assertEqual(self.w.ok(4, "recall", {"key": "k"}, session="s2"), "v2")
        self.assertIsNone(self.w.ok(5, "recall", {"key": "k"}))  # no session: fresh dict
        self.w.send({"type": "session_end", "session": "s1"})  # no answer to this one
        self.assertIsNone(self.w.ok(6, "recall", {"key": "k"}, session="s1"))
        self.assertEqual(self.w.ok(7, "recall", {"key": "k"}, session="s2"), "v2")

    def test_context_fields(self):
        info = self.w.ok(41, "ctx_info", None, session="abc", timeout_ms=60000)
        self.assertEqual(info["call_id"], 41)
        self.assertEqual(info["session_id"], "abc")
        self.assertEqual(info["command"], "ctx_info")
        self.assertTrue(info["has_deadline"])
        self.assertTrue(0 < info["time_left"] <= 60)
        self.assertFalse(info["cancelled"])
        info = self.w.ok(42, "ctx_info")
        self.assertIsNone(info["session_id"])
        self.assertFalse(info["has_deadline"])
        self.assertIsNone(info["time_left"])

    def test_sync_wrapper_returning_a_coroutine_is_awaited(self):
        self.assertEqual(self.w.ok(1, "wrapped_async", [21]), 42)

    def test_loop_serves_pings_and_async_calls_while_a_sync_handler_runs(self):
        self.w.call(1, "gate", ["g"])
        self.assertTrue(self.w.ok(2, "gate_started", ["g"]))  # gate() is now blocking
        self.w.send({"type": "ping", "id": 3})
        self.assertEqual(self.w.recv(), {"type": "pong", "id": 3})
        self.w.call(4, "add", [1, 2])  # sync: queued behind gate(), answered after it
        self.w.call(5, "gate_release", ["g"])
        # gate() may answer before or after gate_release(); add() only after gate()
        replies = [self.w.recv() for _ in range(3)]
        self.assertEqual(sorted((r["id"], r["ok"]) for r in replies),
                         [(1, "released"), (4, 3), (5, True)])
        order = [r["id"] for r in replies]
        self.assertLess(order.index(1), order.index(4))

    def test_unknown_message_types_are_ignored(self):
        self.w.send({"type": "from_the_future", "x": 1})
        self.w.send({"type": "cancel", "id": 999})  # not running: ignored
        self.assertEqual(self.w.ok(1, "echo", ["still here"]), "still here")

    def test_handler_calling_sys_exit_ends_the_worker(self):
        self.w.call(1, "sys_exit", [7])
        self.assertIs(self.w.recv(), EOF)
        self.assertEqual(self.w.wait(), 7)


class ConcurrencyAndCancelTest(unittest.TestCase):
    def setUp(self):
        self.w = WorkerProcess(self, args=["--max-in-flight", "4"])
        self.assertEqual(self.w.handshake()["max_in_flight"], 4)

    def test_async_calls_overlap(self):
        # Each call returns only once all four are running at the same time.
        for i in range(4):
            self.w.call(i, "rendezvous", {"name": "r", "n": 4})
        replies = [self.w.recv() for _ in range(4)]
        self.assertEqual(sorted(r["id"] for r in replies), [0, 1, 2, 3])
        self.assertTrue(all(r.get("ok") == "r" for r in replies), replies)

    def test_cancel_async_call(self):
        self.w.call(1, "hang")
        self.w.call(2, "wait_for_cancel")
        self.w.send({"type": "cancel", "id": 1})
        self.w.send({"type": "cancel", "id": 2})
        replies = [self.w.recv(), self.w.recv()]
        self.assertEqual(sorted((r["type"], r["id"]) for r in replies),
                         [("cancelled", 1), ("cancelled", 2)])
        self.w.send({"type": "cancel", "id": 1})  # already finished: ignored
        self.assertEqual(self.w.ok(3, "echo", [3]), 3)

    def test_cancel_sync_call_sets_the_flag(self):
        self.w.call(1, "block")
        self.w.send({"type": "ping", "id": 2})
        self.assertEqual(self.w.recv(), {"type": "pong", "id": 2})
        self.w.send({"type": "cancel", "id": 1})
        self.assertEqual(self.w.recv(), {"type": "cancelled", "id": 1})
        self.assertEqual(self.w.ok(3, "echo", [3]), 3)

    def test_sync_handler_that_ignores_cancel_gives_its_result(self):
        self.w.call(1, "gate", ["ignore"])
        self.assertTrue(self.w.ok(2, "gate_started", ["ignore"]))
        self.w.send({"type": "cancel", "id": 1})
        self.w.call(3, "gate_release", ["ignore"])
        replies = sorted((self.w.recv() for _ in range(2)), key=lambda r: r["id"])
        self.assertEqual(replies, [{"type": "result", "id": 1, "ok": "released"},
                                   {"type": "result", "id": 3, "ok": True}])

    def test_cancel_of_a_queued_sync_call_skips_it(self):
        self.w.call(1, "gate", ["q"])
        self.assertTrue(self.w.ok(2, "gate_started", ["q"]))
        self.w.call(3, "add", [1, 2])  # queued behind gate()
        self.w.send({"type": "cancel", "id": 3})
        self.w.call(4, "gate_release", ["q"])
        replies = {r["id"]: r for r in (self.w.recv() for _ in range(3))}
        self.assertEqual(replies[1]["ok"], "released")
        self.assertEqual(replies[3], {"type": "cancelled", "id": 3})
        self.assertEqual(replies[4]["ok"], True)

    def test_cancel_streams(self):
        for call_id, command in ((1, "ticker"), (2, "aticker")):
            with self.subTest(command=command):
                self.w.call(call_id, command)
                first = self.w.recv()
                self.assertEqual((first["type"], first["seq"]), ("chunk", 0))
                self.w.send({"type": "cancel", "id": call_id})
                reply = self.w.recv()
                seq = 0
                while reply["type"] == "chunk":  # chunks already on their way
                    seq += 1
                    self.assertEqual(reply["seq"], seq)
                    reply = self.w.recv()
                self.assertEqual(reply, {"type": "cancelled", "id": call_id})
        self.assertEqual(self.w.ok(3, "echo", [3]), 3)

    def test_streams_wait_for_credit(self):
        for call_id, command in ((1, "stream"), (2, "astream"), (3, "stream_made_elsewhere")):
            with self.subTest(command=command):
                self.w.call(call_id, command, [5], window=2)
                first = [self.w.recv() for _ in range(2)]
                self.assertEqual([r["seq"] for r in first], [0, 1])
                # The window is used up: the next frame is the answer to a ping, not an item.
                self.w.send({"type": "ping", "id": 100 + call_id})
                self.assertEqual(self.w.recv(), {"type": "pong", "id": 100 + call_id})
                self.w.send({"type": "credit", "id": call_id, "n": 3})
                rest = [self.w.recv() for _ in range(4)]
                self.assertEqual([r["type"] for r in rest], ["chunk"] * 3 + ["end"])
                self.assertEqual([r["seq"] for r in rest[:3]], [2, 3, 4])

    def test_a_stream_waiting_for_credit_sees_the_cancel(self):
        for call_id, command in ((1, "ticker"), (2, "aticker")):
            with self.subTest(command=command):
                self.w.call(call_id, command, window=1)
                self.assertEqual(self.w.recv()["seq"], 0)
                self.w.send({"type": "cancel", "id": call_id})
                self.assertEqual(self.w.recv(), {"type": "cancelled", "id": call_id})
        self.assertEqual(self.w.ok(3, "echo", [3]), 3)

    def test_a_dangling_attachment_placeholder_fails_only_its_call(self):
        reply = self.w.result(1, "echo", [{"__pypool_att__": 5}])
        self.assertEqual(reply["error"]["type"], "InvalidArguments")
        self.assertIn("out of range", reply["error"]["message"])
        self.assertEqual(self.w.ok(2, "echo", [2]), 2)

    def test_quick_sync_handlers_run_on_the_reader_and_blocking_ones_off_it(self):
        # (Quick ones first: right after a call on the sync thread, the next may still find that
        # thread busy finishing up, and then it is queued there, in order.)
        self.assertEqual(self.w.ok(1, "thread_name"), "pypool-reader")
        self.assertEqual(self.w.ok(2, "thread_name"), "pypool-reader")
        self.assertEqual(self.w.ok(3, "thread_name_after_a_nap"), "pypool-sync")
        self.assertEqual(self.w.ok(4, "thread_name_kept_off_the_reader"), "pypool-sync")

    def test_a_handler_that_runs_long_on_the_reader_moves_off_it(self):
        # Too long twice in a row: the last time on the reader.
        self.assertEqual(self.w.ok(1, "burn", [20]), "pypool-reader")
        self.assertEqual(self.w.ok(2, "burn", [20]), "pypool-reader")
        self.assertEqual(self.w.ok(3, "burn", [1]), "pypool-sync")

    def test_a_cancel_behind_a_call_on_the_reader_is_seen_before_the_call_starts(self):
        # Both calls and the cancel arrive together: the cancel is read before anything runs.
        self.w.send_raw(b"".join([
            wire.frame_bytes({"type": "call", "id": 1, "command": "burn", "args": [2]}),
            wire.frame_bytes({"type": "call", "id": 2, "command": "thread_name", "args": None}),
            wire.frame_bytes({"type": "cancel", "id": 2}),
        ]))
        replies = {r["id"]: r for r in (self.w.recv() for _ in range(2))}
        self.assertEqual(replies[1]["ok"], "pypool-reader")
        self.assertEqual(replies[2], {"type": "cancelled", "id": 2})

    def test_cancelled_raised_without_cancel_is_an_error(self):
        error = self.w.result(1, "raise_cancelled")["error"]
        self.assertEqual(error["type"], "pypool_worker.Cancelled")


class BatchTest(unittest.TestCase):
    """Batch calls (a chunk of the pool's map): the handler runs once per item."""

    def setUp(self):
        self.w = WorkerProcess(self, args=["--max-in-flight", "4"])
        self.w.handshake()

    def test_every_item_answers_in_order_and_a_failing_item_fails_alone(self):
        reply = self.w.result(1, "add", [[1, 2], {"a": 3, "b": 4}, [1], [5, 5]], batch=True)
        self.assertEqual(reply["ok"], [3, 7, None, 10])
        self.assertEqual([e["index"] for e in reply["errors"]], [2])
        error = reply["errors"][0]["error"]
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("add", error["traceback"])
        self.assertEqual(self.w.ok(2, "echo", [2]), 2)

    def test_items_the_pool_marks_as_scalars_are_each_the_one_argument(self):
        items = [1, "two", 3.5, True, 2 ** 70]
        self.assertEqual(self.w.ok(1, "echo", items, batch=True, scalars=True), items)
        # Without the mark the worker looks at the items: a list is positional arguments.
        self.assertEqual(self.w.ok(2, "echo", [[1], ["two"]], batch=True), [1, "two"])

    def test_bytes_travel_with_their_items(self):
        items = [[b"a" * n] for n in (0, 1, 1000)] + [[{"k": b"\xff", "l": [b"x"]}]]
        self.assertEqual(self.w.ok(1, "echo", items, batch=True),
                         [b"", b"a", b"a" * 1000, {"k": b"\xff", "l": [b"x"]}])

    def test_streams_are_collected_and_async_items_run_concurrently(self):
        self.assertEqual(self.w.ok(1, "stream", [[0], [2], [3]], batch=True),
                         [[], [0, 1], [0, 1, 2]])
        self.assertEqual(self.w.ok(2, "astream", [[2]], batch=True),
                         [[{"i": 0, "b": b"\x00"}, {"i": 1, "b": b"\x01"}]])
        # Each item returns only once all four run at the same time.
        self.assertEqual(self.w.ok(3, "rendezvous", [{"name": "b", "n": 4}] * 4, batch=True),
                         ["b"] * 4)

    def test_an_item_whose_result_cannot_be_sent_fails_alone(self):
        reply = self.w.result(1, "unencodable_if", [[False], [True], [False]], batch=True)
        self.assertEqual(reply["ok"], ["fine", None, "fine"])
        self.assertEqual([e["index"] for e in reply["errors"]], [1])
        self.assertIn("cannot send the result", reply["errors"][0]["error"]["message"])

    def test_a_batch_whose_args_are_not_a_list_is_refused(self):
        error = self.w.result(1, "echo", {"value": 1}, batch=True)["error"]
        self.assertEqual(error["type"], "InvalidArguments")
        self.assertEqual(self.w.ok(2, "echo", [2]), 2)

    def test_a_cancel_stops_the_batch_between_items(self):
        self.w.call(1, "gate", [["c"], ["c"], ["c"]], batch=True)
        self.assertTrue(self.w.ok(2, "gate_started", ["c"]))
        self.w.send({"type": "cancel", "id": 1})
        self.w.call(3, "gate_release", ["c"])
        replies = sorted((self.w.recv() for _ in range(2)), key=lambda r: r["id"])
        self.assertEqual(replies, [{"type": "cancelled", "id": 1},
                                   {"type": "result", "id": 3, "ok": True}])
        self.assertEqual(self.w.ok(4, "echo", [4]), 4)


class SyncOnlyAppTest(unittest.TestCase):
    """An app without async handlers: no asyncio, and the reader is the main thread."""

    def setUp(self):
        self.w = WorkerProcess(self, app=os.path.join(wire.APPS_DIR, "sync_only_app.py"))
        self.w.handshake()

    def test_heavy_modules_are_not_imported(self):
        self.assertEqual(self.w.ok(1, "loaded_lazy_modules"), [])
        self.assertEqual(self.w.ok(2, "echo", [b"\x00"]), b"\x00")
        # an error needs traceback, but still no event loop
        self.assertEqual(self.w.result(3, "fail")["error"]["type"], "KeyError")
        self.assertEqual(self.w.ok(4, "loaded_lazy_modules"), ["traceback"])

    def test_error_text_that_is_not_utf8_is_escaped(self):
        error = self.w.result(1, "surrogate_error")["error"]
        self.assertEqual((error["type"], error["message"]), ("ValueError", "bad \\udcff name"))
        self.assertEqual(self.w.ok(2, "echo", [1]), 1)

    def test_sync_handlers_always_run_on_the_same_thread(self):
        for i in range(3):
            self.w.call(i, "thread_id")  # queued back to back
        ids = {self.w.recv()["ok"] for _ in range(3)}
        ids.add(self.w.ok(3, "thread_id"))
        self.assertEqual(len(ids), 1)

    def test_ping_and_cancel_while_a_sync_handler_runs(self):
        self.w.call(1, "spin")
        self.w.send({"type": "ping", "id": 2})
        self.assertEqual(self.w.recv(), {"type": "pong", "id": 2})
        self.w.call(3, "echo", ["queued"])
        self.w.send({"type": "cancel", "id": 1})
        self.assertEqual(self.w.recv(), {"type": "cancelled", "id": 1})
        self.assertEqual(self.w.recv(), {"type": "result", "id": 3, "ok": "queued"})

    def test_returned_coroutine_starts_a_loop_on_demand(self):
        self.assertEqual(self.w.ok(1, "returns_coroutine", [21]), 42)
        self.assertEqual(self.w.ok(2, "returns_coroutine", [2]), 4)
        self.assertIn("asyncio", self.w.ok(3, "loaded_lazy_modules"))
        self.assertEqual(self.w.ok(4, "echo", ["still sync"]), "still sync")

    def test_shutdown_and_eof_while_a_sync_handler_runs(self):
        self.w.call(1, "spin")
        self.w.send({"type": "shutdown"})
        self.assertEqual(self.w.recv(), {"type": "goodbye"})
        self.assertEqual(self.w.wait(), 0)
        w = WorkerProcess(self, app=os.path.join(wire.APPS_DIR, "sync_only_app.py"))
        w.handshake()
        w.call(1, "spin")
        w.close_stdin()
        self.assertIs(w.recv(), EOF)
        self.assertEqual(w.wait(), 0)

    def test_sigterm_exits_0(self):
        self.w.call(1, "spin")
        self.w.send({"type": "ping", "id": 2})  # the handler is running once this is answered
        self.assertEqual(self.w.recv(), {"type": "pong", "id": 2})
        self.w.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.w.wait(), 0)


class LifecycleTest(unittest.TestCase):
    def test_shutdown_answers_goodbye_and_exits_0(self):
        w = WorkerProcess(self)
        w.handshake()
        w.send({"type": "shutdown"})
        self.assertEqual(w.recv(), {"type": "goodbye"})
        self.assertIs(w.recv(), EOF)
        self.assertEqual(w.wait(), 0)

    def test_shutdown_does_not_wait_for_a_running_sync_handler(self):
        w = WorkerProcess(self)
        w.handshake()
        w.call(1, "gate", ["never released"])
        self.assertTrue(w.ok(2, "gate_started", ["never released"]))
        w.send({"type": "shutdown"})
        self.assertEqual(w.recv(), {"type": "goodbye"})
        self.assertEqual(w.wait(), 0)

    def test_stdin_eof_exits_0(self):
        w = WorkerProcess(self)
        w.handshake()
        w.call(1, "gate", ["never released"])
        self.assertTrue(w.ok(2, "gate_started", ["never released"]))
        w.close_stdin()
        self.assertIs(w.recv(), EOF)
        self.assertEqual(w.wait(), 0)

    def test_eof_before_welcome_exits_0(self):
        w = WorkerProcess(self)
        self.assertEqual(w.recv()["type"], "hello")
        w.close_stdin()
        self.assertEqual(w.wait(), 0)

    def test_sigterm_exits_0_even_during_a_sync_handler(self):
        w = WorkerProcess(self)
        w.handshake()
        w.call(1, "gate", ["never released"])
        self.assertTrue(w.ok(2, "gate_started", ["never released"]))
        w.proc.send_signal(signal.SIGTERM)
        self.assertEqual(w.wait(), 0)

    def test_sigterm_before_welcome_exits_0(self):
        w = WorkerProcess(self)
        self.assertEqual(w.recv()["type"], "hello")
        w.proc.send_signal(signal.SIGTERM)
        self.assertEqual(w.wait(), 0)

    def test_import_failure_sends_startup_error_and_exits_2(self):
        w = WorkerProcess(self, app=os.path.join(wire.TESTKIT_APPS_DIR, "broken_import_app.py"))
        msg = w.recv()
        self.assertEqual(msg["type"], "startup_error")
        error = msg["error"]
        self.assertEqual(error["type"], "ModuleNotFoundError")
        self.assertIn("missing_dependency_for_pypool_tests", error["message"])
        self.assertIn("broken_import_app.py", error["traceback"])
        self.assertIs(w.recv(), EOF)
        self.assertEqual(w.wait(), 2)
        self.assertIn("startup failed", w.stderr())

    def test_unknown_app_module(self):
        w = WorkerProcess(self, app="no_such_app_module_anywhere")
        msg = w.recv()
        self.assertEqual(msg["type"], "startup_error")
        self.assertEqual(msg["error"]["type"], "ModuleNotFoundError")
        self.assertEqual(w.wait(), 2)

    def test_bad_options_send_startup_error(self):
        for args in (["--max-in-flight", "0"], ["--bogus"], ["--max-in-flight", "x"]):
            with self.subTest(args=args):
                w = WorkerProcess(self, args=args)
                msg = w.recv()
                self.assertEqual(msg["type"], "startup_error", msg)
                self.assertEqual(msg["error"]["type"], "pypool_worker.runtime.UsageError")
                self.assertEqual(w.wait(), 2)

    def test_app_without_handlers_is_a_startup_error(self):
        w = WorkerProcess(self, app=os.path.join(wire.APPS_DIR, "no_handlers_app.py"))
        msg = w.recv()
        self.assertEqual(msg["type"], "startup_error")
        self.assertIn("no handlers", msg["error"]["message"])
        self.assertEqual(w.wait(), 2)


class ProtocolErrorTest(unittest.TestCase):
    def test_oversize_frame_exits_3(self):
        w = WorkerProcess(self)
        w.handshake()
        w.send_raw(struct.pack(">I", protocol.DEFAULT_MAX_FRAME + 1))
        self.assertEqual(w.wait(), 3)
        self.assertIn("exceeds max_frame", w.stderr())

    def test_welcome_max_frame_is_enforced_both_ways(self):
        w = WorkerProcess(self)
        w.handshake(max_frame=4096)
        error = w.result(1, "big", [10000])["error"]
        self.assertEqual(error["type"], "pypool_worker.FrameTooLarge")
        self.assertEqual(len(w.ok(2, "big", [1000])), 1000)
        w.call(3, "echo", ["x" * 5000])  # larger than the max_frame the pool announced
        self.assertEqual(w.wait(), 3)

    def test_bad_codec_byte_exits_3(self):
        w = WorkerProcess(self)
        w.handshake()
        bad = b"X" + struct.pack(">I", 2) + b"{}"
        w.send_raw(struct.pack(">I", len(bad)) + bad)
        self.assertEqual(w.wait(), 3)

    def test_call_missing_fields_exits_3(self):
        w = WorkerProcess(self)
        w.handshake()
        w.send({"type": "call", "command": "echo"})
        self.assertEqual(w.wait(), 3)
        self.assertIn("protocol error", w.stderr())

    def test_wrong_first_message_exits_3(self):
        w = WorkerProcess(self)
        self.assertEqual(w.recv()["type"], "hello")
        w.send({"type": "call", "id": 1, "command": "echo", "args": [1]})
        self.assertEqual(w.wait(), 3)


@unittest.skipIf(msgpack is None, "msgpack is not installed")
class MsgpackWorkerTest(unittest.TestCase):
    def test_calls_over_msgpack(self):
        w = WorkerProcess(self)
        self.assertIn("msgpack", w.handshake(codec="msgpack")["codecs"])
        value = {"b": b"\x00" * 100, "s": "x", "l": [1, 2.5, None]}
        w.call(1, "echo", {"value": value})
        raw_reply = w.recv()
        self.assertEqual(raw_reply["ok"], value)
        # JSON is still accepted from the pool after WELCOME chose msgpack
        w.send_raw(wire.frame_bytes({"type": "ping", "id": 5}, protocol.JSON))
        self.assertEqual(w.recv(), {"type": "pong", "id": 5})


class MarshalWorkerTest(unittest.TestCase):
    """The codec a worker without msgpack gets: every kind of reply, over marshal."""

    def test_calls_over_marshal(self):
        w = WorkerProcess(self)
        self.assertIn("marshal", w.handshake(codec="marshal")["codecs"])
        value = {"b": b"\x00" * 100, "s": "x", "l": [1, 2.5, None], "big": 2 ** 40}
        self.assertEqual(w.ok(1, "echo", {"value": value}), value)
        self.assertEqual(w.ok(2, "add", [2, 3]), 5)
        self.assertEqual(w.result(3, "fail", ["boom"])["error"]["type"], "ValueError")
        w.call(4, "stream", [2])
        self.assertEqual([w.recv()["type"] for _ in range(3)], ["chunk", "chunk", "end"])
        reply = w.result(5, "add", [[1, 2], [3, 4]], batch=True)
        self.assertEqual(reply["ok"], [3, 7])
        # JSON from the pool is still accepted after WELCOME chose marshal.
        w.send_raw(wire.frame_bytes({"type": "ping", "id": 6}, protocol.JSON))
        self.assertEqual(w.recv(), {"type": "pong", "id": 6})


class IpcTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = os.path.join(self.tmp.name, "pool.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.server.close)
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(TIMEOUT)
        self.secret = os.urandom(32)

    def spawn(self):
        read_fd, write_fd = os.pipe()
        os.write(write_fd, self.secret.hex().encode())
        os.close(write_fd)
        self.addCleanup(os.close, read_fd)
        self.secret_fd = read_fd
        env = wire.worker_env({"PYPOOL_IPC_PATH": self.path, "PYPOOL_SECRET_FD": str(read_fd)})
        proc = subprocess.Popen(
            [sys.executable, "-m", "pypool_worker", "--app", wire.E2E_APP, "--transport", "ipc"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            cwd=wire.TESTS_DIR, pass_fds=(read_fd,))

        def reap():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

        self.addCleanup(reap)
        conn, _ = self.server.accept()
        conn.settimeout(None)
        self.addCleanup(conn.close)
        reader = wire.FrameReader(conn.recv_into)
        self.addCleanup(reader.join)
        self.addCleanup(self._shutdown, conn)  # wakes the reader thread
        return proc, conn, reader

    @staticmethod
    def _shutdown(conn):
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def test_challenge_auth_hello_and_calls(self):
        proc, conn, reader = self.spawn()
        nonce = os.urandom(32).hex()
        conn.sendall(wire.frame_bytes({"type": "challenge", "nonce": nonce}))
        auth = reader.recv()
        self.assertEqual(auth["type"], "auth")
        expected = hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()
        self.assertEqual(auth["mac"], expected)
        hello = reader.recv()
        self.assertEqual(hello["type"], "hello")
        self.assertEqual(hello["pid"], proc.pid)
        conn.sendall(wire.frame_bytes({"type": "welcome", "codec": "json", "pool": "t",
                                       "worker_id": "w-test", "max_frame": 1 << 20}))

        def call(call_id, command, args):
            conn.sendall(wire.frame_bytes({"type": "call", "id": call_id, "command": command,
                                           "args": args}))
            reply = reader.recv()
            self.assertEqual(reply["id"], call_id)
            return reply["ok"]

        self.assertEqual(call(1, "echo", [b"\x00\x01" * 50000]), b"\x00\x01" * 50000)
        self.assertIsNone(call(2, "env", ["PYPOOL_SECRET_FD"]))  # removed before the app ran
        # The secret's pipe was closed before the app ran (its number may be in use again).
        self.assertNotEqual(call(4, "fd_inode", [self.secret_fd]),
                            os.fstat(self.secret_fd).st_ino)
        self.assertEqual(call(3, "noisy", ["n"]), "n")
        conn.sendall(wire.frame_bytes({"type": "shutdown"}))
        self.assertEqual(reader.recv(), {"type": "goodbye"})
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(out, b"")  # stray output went to stderr
        self.assertIn(b"noise from print", err)

    def test_channel_close_exits_0(self):
        proc, conn, reader = self.spawn()
        conn.sendall(wire.frame_bytes({"type": "challenge", "nonce": "ab"}))
        self.assertEqual(reader.recv()["type"], "auth")
        self.assertEqual(reader.recv()["type"], "hello")
        conn.shutdown(socket.SHUT_RDWR)
        self.assertEqual(proc.wait(TIMEOUT), 0)


@unittest.skipUnless(sys.platform.startswith("linux"), "needs PR_SET_CHILD_SUBREAPER")
class ParentDeathTest(unittest.TestCase):
    def test_worker_exits_when_its_parent_dies(self):
        # This test process becomes the subreaper, so the orphaned worker is re-parented to us
        # (its getppid changes) and we can reap it; its pipes stay open, so only the parent
        # watch can make it exit.
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            self.skipTest("prctl(PR_SET_CHILD_SUBREAPER) failed")
        self.addCleanup(libc.prctl, PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        for fd in (to_worker_w, from_worker_r):
            self.addCleanup(os.close, fd)
        launcher = (
            "import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-m', 'pypool_worker', '--app', sys.argv[1]],"
            " stdin=int(sys.argv[2]), stdout=int(sys.argv[3]), pass_fds=(int(sys.argv[2]),"
            " int(sys.argv[3])))\n"
            "print(p.pid, flush=True)\n"
            "sys.stdin.read()\n"  # stay the worker's parent until the test closes our stdin
        )
        stderr_file = tempfile.TemporaryFile()  # the worker's too; it inherits it
        self.addCleanup(stderr_file.close)
        middle = subprocess.Popen(
            [sys.executable, "-c", launcher, wire.E2E_APP, str(to_worker_r), str(from_worker_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file,
            env=wire.worker_env(), pass_fds=(to_worker_r, from_worker_w))
        self.addCleanup(middle.wait)
        self.addCleanup(middle.kill)
        os.close(to_worker_r)
        os.close(from_worker_w)
        worker_pid = int(middle.stdout.readline())
        middle.stdout.close()

        def kill_worker():
            try:
                os.kill(worker_pid, signal.SIGKILL)
                os.waitpid(worker_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

        self.addCleanup(kill_worker)
        reader = wire.FrameReader(lambda view: os.readv(from_worker_r, [view]))
        self.addCleanup(reader.join)
        # HELLO comes after the worker noted its parent; only then may the parent go.
        self.assertEqual(reader.recv()["pid"], worker_pid)
        middle.stdin.close()
        self.assertEqual(middle.wait(TIMEOUT), 0)
        self.assertIs(reader.recv(), EOF)  # the worker exited though its stdin is still open
        _, status = os.waitpid(worker_pid, 0)
        self.assertTrue(os.WIFEXITED(status))
        self.assertEqual(os.WEXITSTATUS(status), 0)
        stderr_file.seek(0)
        self.assertIn(b"went away", stderr_file.read())


if __name__ == "__main__":
    unittest.main()
