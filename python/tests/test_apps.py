"""The apps shipped beside the runtime: pool-testkit's conformance app and the text_stats example."""

import os
import signal
import unittest

import wire
from wire import EOF, WorkerProcess

CONFORMANCE_APP = os.path.join(wire.TESTKIT_APPS_DIR, "conformance_app.py")
TEXT_STATS_APP = os.path.join(wire.EXAMPLES_DIR, "text_stats.py")


@unittest.skipUnless(os.path.exists(CONFORMANCE_APP), "pool-testkit/apps not found")
class ConformanceAppTest(unittest.TestCase):
    def setUp(self):
        self.w = WorkerProcess(self, app=CONFORMANCE_APP)
        self.hello = self.w.handshake()

    def test_serves_the_commands_the_suite_calls(self):
        self.assertEqual(self.hello["max_in_flight"], 4)
        for command in ("echo", "add", "fail", "noisy", "sleep", "exit", "kill_self", "pid",
                        "remember", "recall", "async_sleep", "stream", "stderr_then_exit"):
            self.assertIn(command, self.hello["commands"])

    def test_handlers(self):
        w = self.w
        self.assertEqual(w.ok(1, "echo", {"value": [b"\x00raw", {"k": "v"}]}),
                         [b"\x00raw", {"k": "v"}])
        self.assertEqual(w.ok(2, "add", {"a": 2, "b": 40}), 42)
        error = w.result(3, "fail", {"message": "nope"})["error"]
        self.assertEqual((error["type"], error["message"]), ("ValueError", "nope"))
        self.assertEqual(w.ok(4, "noisy", {"value": "quiet"}), "quiet")
        self.assertEqual(w.ok(5, "sleep", {"seconds": 0.01}), 0.01)
        self.assertEqual(w.ok(6, "pid"), w.proc.pid)
        self.assertIsNone(w.ok(7, "remember", {"key": "a", "value": 1}, session="s"))
        self.assertEqual(w.ok(8, "recall", {"key": "a"}, session="s"), 1)
        self.assertIsNone(w.ok(9, "recall", {"key": "a"}, session="other"))
        self.assertEqual(w.ok(10, "async_sleep", {"seconds": 0.01}), 0.01)
        w.call(11, "stream", {"n": 3})
        self.assertEqual([w.recv()["type"] for _ in range(4)], ["chunk"] * 3 + ["end"])
        self.assertIn("garbage", w.stderr())

    def test_concurrent_async_sleeps_all_answer(self):
        for i in range(4):
            self.w.call(i, "async_sleep", {"seconds": 0.3})
        self.assertEqual(sorted(self.w.recv()["id"] for _ in range(4)), [0, 1, 2, 3])

    def test_exit(self):
        self.w.call(1, "exit", {"code": 3})
        self.assertIs(self.w.recv(), EOF)
        self.assertEqual(self.w.wait(), 3)

    def test_kill_self(self):
        self.w.call(1, "kill_self")
        self.assertEqual(self.w.wait(), -signal.SIGKILL)

    def test_stderr_then_exit(self):
        self.w.call(1, "stderr_then_exit", {"code": 5, "line": "last words"})
        self.assertEqual(self.w.wait(), 5)
        self.assertIn("last words\n", self.w.stderr())


@unittest.skipUnless(os.path.exists(TEXT_STATS_APP), "examples/text_stats.py not found")
class TextStatsExampleTest(unittest.TestCase):
    TEXT = ("The cat sat on the mat. The cat was happy!\n"
            "\n"
            "Dogs chase cats; cats ignore dogs.")

    def setUp(self):
        self.w = WorkerProcess(self, app=TEXT_STATS_APP)
        self.w.handshake()

    def test_counts(self):
        self.assertEqual(self.w.ok(1, "word_count", [self.TEXT]),
                         {"words": 16, "unique": 11, "sentences": 3, "characters": len(self.TEXT)})
        self.assertEqual(self.w.ok(2, "word_count", [self.TEXT.encode()])["words"], 16)
        self.assertEqual(self.w.ok(3, "top_words", {"text": self.TEXT, "n": 2}),
                         [["cat", 2], ["cats", 2]])

    def test_readability(self):
        result = self.w.ok(1, "readability", [self.TEXT])
        self.assertEqual(result["sentences"], 3)
        self.assertGreater(result["flesch_reading_ease"], 80)  # short words, short sentences
        self.assertEqual(self.w.result(2, "readability", [""])["error"]["type"], "ValueError")

    def test_streamed_line_analysis(self):
        self.w.call(1, "analyze_lines", [self.TEXT])
        replies = [self.w.recv() for _ in range(3)]
        self.assertEqual([r["type"] for r in replies], ["chunk", "chunk", "end"])
        self.assertEqual([r["value"]["line"] for r in replies[:2]], [1, 3])

    def test_corpus_in_session(self):
        w = self.w
        self.assertEqual(w.ok(1, "add_document", ["red fish blue fish"], session="c"),
                         {"documents": 1, "words": 4})
        self.assertEqual(w.ok(2, "add_document", ["one fish"], session="c"),
                         {"documents": 2, "words": 6})
        summary = w.ok(3, "corpus_summary", {"n": 1}, session="c")
        self.assertEqual(summary["top_words"], [["fish", 3]])
        self.assertEqual(w.ok(4, "corpus_summary", [], session="other")["documents"], 0)
        w.send({"type": "session_end", "session": "c"})
        self.assertEqual(w.ok(5, "corpus_summary", [], session="c")["documents"], 0)


if __name__ == "__main__":
    unittest.main()
