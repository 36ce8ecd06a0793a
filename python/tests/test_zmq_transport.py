"""The zmq channel: signing (stdlib only) and, with pyzmq, a real pyzmq ROUTER playing the pool.

The bare-python3 run skips the pyzmq cases; the venv run of scripts/test.sh has pyzmq.
"""

import hashlib
import hmac
import os
import tempfile
import threading
import unittest

import wire
from pypool_worker import protocol, zmq_transport, zmq_workers
from pypool_worker.protocol import ProtocolError

try:
    import zmq
except ImportError:  # the bare-python3 run
    zmq = None

KEY = bytes(range(32))


def _body(header):
    return b"".join(protocol.encode_body(header))


class SignerTest(unittest.TestCase):
    def pair(self):
        key = zmq_transport.session_key(KEY, "pool-nonce", "worker-nonce")
        return (zmq_transport.Signer(key, zmq_transport.TO_POOL, zmq_transport.TO_WORKER),
                zmq_transport.Signer(key, zmq_transport.TO_WORKER, zmq_transport.TO_POOL))

    def test_messages_in_order_pass_and_split_bodies_sign_alike(self):
        worker, pool = self.pair()
        for parts in ([b"one"], [b"head", b"attachment"], [b""]):
            envelope = worker.envelope(parts)
            self.assertEqual(len(envelope), zmq_transport.ENVELOPE_LEN)
            self.assertEqual(pool.check([envelope, b"".join(parts)]), [b"".join(parts)])

    def test_replay_tampering_and_reflection_fail(self):
        worker, pool = self.pair()
        first = worker.envelope([b"one"])
        pool.check([first, b"one"])
        with self.assertRaisesRegex(ProtocolError, "replayed"):
            pool.check([first, b"one"])
        second = worker.envelope([b"two"])
        with self.assertRaisesRegex(ProtocolError, "wrong signature"):
            pool.check([second, b"tw0"])
        with self.assertRaisesRegex(ProtocolError, "envelope"):
            pool.check([second[:10], b"two"])
        # A message the worker signed, reflected back to the worker, fails.
        sender, _ = self.pair()
        reflected = sender.envelope([b"x"])
        fresh_worker, _ = self.pair()
        with self.assertRaisesRegex(ProtocolError, "wrong signature"):
            fresh_worker.check([reflected, b"x"])

    def test_session_key_matches_its_definition(self):
        # The Rust side computes the same: HMAC(secret, label 0 pool_nonce 0 worker_nonce).
        expected = hmac.new(KEY, b"pypool-zmq-session-v1\x00p\x00w", hashlib.sha256).digest()
        self.assertEqual(zmq_transport.session_key(KEY, "p", "w"), expected)

    def test_secrets(self):
        self.assertEqual(zmq_transport.parse_secret(" %s\n" % KEY.hex()), KEY)
        for bad in ("zz", "00ff"):
            with self.subTest(bad=bad), self.assertRaises(zmq_transport.TransportError):
                zmq_transport.parse_secret(bad)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "secret")
            with open(path, "w") as f:
                f.write(KEY.hex() + "\n")
            self.assertEqual(zmq_transport.load_secret_file(path), KEY)
            with self.assertRaises(zmq_transport.TransportError):
                zmq_transport.load_secret_file(os.path.join(tmp, "missing"))

    def test_workers_argv_drops_only_workers(self):
        self.assertEqual(
            zmq_workers._child_argv(["--app", "a", "--workers", "3", "--transport=zmq",
                                     "--workers=2", "--connect", "tcp://h:1"]),
            ["--app", "a", "--transport=zmq", "--connect", "tcp://h:1"])


@unittest.skipIf(zmq is None, "pyzmq is not installed (the venv run of scripts/test.sh has it)")
class ChannelTest(unittest.TestCase):
    """A pyzmq ROUTER in this process plays the pool's part of JOIN/CHALLENGE/AUTH."""

    def setUp(self):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVTIMEO, int(wire.TIMEOUT * 1000))
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = "tcp://127.0.0.1:%d" % port
        self.channel = None

    def tearDown(self):
        if self.channel is not None:
            self.channel.flush_and_close(0)
        self.router.close(0)
        self.ctx.term()

    def join(self, key=KEY):
        """Runs the pool's side of joining; returns (identity, pool signer) once AUTH is right."""
        self.channel = zmq_transport.ZmqChannel(self.endpoint, b"test-worker", key)
        result = {}
        thread = threading.Thread(target=lambda: result.update(ok=self.channel.join()))
        thread.start()
        identity, body = self.router.recv_multipart()
        join = protocol.decode_body(body)
        self.assertEqual((identity, join["type"], join["transport"]),
                         (b"test-worker", "join", 1))
        self.router.send_multipart([identity, _body({"type": "challenge", "nonce": "n" * 64})])
        _, body = self.router.recv_multipart()
        auth = protocol.decode_body(body)
        thread.join(wire.TIMEOUT)
        self.assertTrue(result.get("ok"))
        self.assertEqual(auth["type"], "auth")
        expected = zmq_transport.auth_mac(KEY, "n" * 64)
        if not hmac.compare_digest(auth["mac"], expected):
            return identity, None
        key = zmq_transport.session_key(KEY, "n" * 64, join["nonce"])
        return identity, zmq_transport.Signer(key, zmq_transport.TO_WORKER,
                                              zmq_transport.TO_POOL)

    def test_signed_messages_both_ways(self):
        identity, pool = self.join()
        self.channel.send({"type": "hello", "pid": 1})
        frames = self.router.recv_multipart()
        self.assertEqual(frames[0], identity)
        body = pool.check(frames[1:])
        self.assertEqual(protocol.decode_body(b"".join(body))["type"], "hello")
        # Attachments go out as their own frames, signed as one body.
        self.channel.send({"type": "result", "id": 1, "ok": b"\x00" * 100000})
        frames = self.router.recv_multipart()
        self.assertGreater(len(frames), 3)
        msg = protocol.decode_body(b"".join(pool.check(frames[1:])))
        self.assertEqual(msg["ok"], b"\x00" * 100000)
        parts = protocol.encode_body({"type": "ping", "id": 7})
        self.router.send_multipart([identity, pool.envelope(parts)] + parts)
        self.assertEqual(self.channel.recv(), {"type": "ping", "id": 7})

    def test_forged_and_replayed_messages_are_protocol_errors(self):
        identity, pool = self.join()
        parts = protocol.encode_body({"type": "ping", "id": 1})
        envelope = pool.envelope(parts)
        self.router.send_multipart([identity, envelope] + parts)
        self.assertEqual(self.channel.recv()["id"], 1)
        self.router.send_multipart([identity, envelope] + parts)  # the same again
        with self.assertRaisesRegex(ProtocolError, "replayed"):
            self.channel.recv()

    def test_tampered_message_is_a_protocol_error(self):
        identity, pool = self.join()
        parts = protocol.encode_body({"type": "ping", "id": 1})
        envelope = pool.envelope(parts)
        tampered = _body({"type": "ping", "id": 2})
        self.router.send_multipart([identity, envelope, tampered])
        with self.assertRaisesRegex(ProtocolError, "wrong signature"):
            self.channel.recv()

    def test_a_lost_connection_reads_as_the_end(self):
        identity, pool = self.join()
        self.router.close(0)
        self.assertIsNone(self.channel.recv())

    def test_a_reject_is_reported(self):
        self.channel = zmq_transport.ZmqChannel(self.endpoint, b"test-worker", KEY)
        errors = []

        def join():
            try:
                self.channel.join()
            except zmq_transport.TransportError as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=join)
        thread.start()
        identity, _ = self.router.recv_multipart()
        self.router.send_multipart([identity, _body({"type": "reject", "reason": "pool full"})])
        thread.join(wire.TIMEOUT)
        self.assertEqual(len(errors), 1)
        self.assertIn("pool full", errors[0])

    def test_writes_from_other_threads_wake_a_blocked_reader(self):
        identity, pool = self.join()
        got = []
        reader = threading.Thread(target=lambda: got.append(self.channel.recv()))
        reader.start()
        for i in range(50):  # writers use the socket while the reader waits on it
            self.channel.send({"type": "pong", "id": i})
        for i in range(50):
            frames = self.router.recv_multipart()
            self.assertEqual(protocol.decode_body(b"".join(pool.check(frames[1:])))["id"], i)
        parts = protocol.encode_body({"type": "ping", "id": 99})
        self.router.send_multipart([identity, pool.envelope(parts)] + parts)
        reader.join(wire.TIMEOUT)
        self.assertEqual(got, [{"type": "ping", "id": 99}])


if __name__ == "__main__":
    unittest.main()
