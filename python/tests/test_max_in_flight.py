"""How many calls a worker takes at once when nobody says: loud defaults, not silent ones."""

import os
import time
import types
import unittest

import wire
from pypool_worker import runtime

ASYNC_ONLY_APP = os.path.join(wire.APPS_DIR, "async_only_app.py")


async def _async_handler():
    pass


def _sync_handler():
    pass


def _handlers(**fns):
    return {name: runtime._Handler(name, fn) for name, fn in fns.items()}


class DefaultTest(unittest.TestCase):
    def setUp(self):
        self.logged = []
        original = runtime.log
        runtime.log = self.logged.append
        self.addCleanup(setattr, runtime, "log", original)

    def choose(self, option=None, app=None, **fns):
        return runtime._max_in_flight(option, app or types.ModuleType("app"), _handlers(**fns))

    def test_async_only_apps_take_several_calls_and_say_so(self):
        self.assertEqual(self.choose(a=_async_handler, b=_async_handler),
                         runtime.ASYNC_MAX_IN_FLIGHT)
        self.assertGreater(runtime.ASYNC_MAX_IN_FLIGHT, 1)
        self.assertEqual(len(self.logged), 1)
        self.assertIn("every handler is async", self.logged[0])

    def test_mixed_apps_take_one_call_and_say_how_to_change_it(self):
        self.assertEqual(self.choose(a=_async_handler, s=_sync_handler), 1)
        self.assertEqual(len(self.logged), 1)
        self.assertIn("PYPOOL_MAX_IN_FLIGHT", self.logged[0])
        self.assertIn("async: a", self.logged[0])

    def test_sync_only_apps_take_one_call_quietly(self):
        self.assertEqual(self.choose(s=_sync_handler), 1)
        self.assertEqual(self.logged, [])

    def test_what_the_app_or_the_option_says_wins(self):
        app = types.ModuleType("app")
        app.PYPOOL_MAX_IN_FLIGHT = 2
        self.assertEqual(self.choose(app=app, a=_async_handler), 2)
        self.assertEqual(self.choose(option=3, a=_async_handler), 3)
        self.assertEqual(self.logged, [])
        app.PYPOOL_MAX_IN_FLIGHT = 0
        with self.assertRaises(runtime.UsageError):
            self.choose(app=app, a=_async_handler)


class AsyncOnlyWorkerTest(unittest.TestCase):
    def test_concurrent_calls_overlap_on_the_event_loop(self):
        w = wire.WorkerProcess(self, app=ASYNC_ONLY_APP)
        hello = w.handshake()
        self.assertEqual(hello["max_in_flight"], runtime.ASYNC_MAX_IN_FLIGHT)
        began = time.monotonic()
        for i in range(8):
            w.call(i, "nap", {"seconds": 0.5})
        ids = sorted(w.recv()["id"] for _ in range(8))
        took = time.monotonic() - began
        self.assertEqual(ids, list(range(8)))
        # Eight half-second naps one after another would take 4 s.
        self.assertLess(took, 4.0)
        w.close_stdin()
        self.assertEqual(w.wait(), 0)
        self.assertIn("every handler is async", w.stderr())


if __name__ == "__main__":
    unittest.main()
