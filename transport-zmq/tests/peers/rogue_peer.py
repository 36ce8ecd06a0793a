"""A misbehaving zmq peer for the transport's tests: joins the pool like a worker (with the
right secret), says HELLO, and then breaks the rules one way.

usage: rogue_peer.py ENDPOINT SECRET_FILE MODE [IDENTITY]

MODE:
  replay    send the (genuinely signed) HELLO a second time, after WELCOME
  tamper    send a signed PONG whose body was altered after signing
  unsigned  send a PONG without the signature envelope
  stranger  skip joining: send a message before JOIN
  impostor  connect with IDENTITY (another worker's) and send an unsigned message at once

Prints one line: ``dropped`` once the pool closed the connection (the expected outcome), or
what it got instead; exits 0 only for ``dropped``.
"""

import os
import sys

from pypool_worker import protocol, zmq_transport

TIMEOUT_MS = 30000


def main():
    endpoint, secret_file, mode = sys.argv[1:4]
    key = zmq_transport.load_secret_file(secret_file)
    identity = sys.argv[4].encode() if mode == "impostor" else ("rogue/%d" % os.getpid()).encode()
    channel = zmq_transport.ZmqChannel(endpoint, identity, key)
    if mode in ("stranger", "impostor"):
        channel._send_raw({"type": "hello"})
    else:
        if not channel.join():
            print("closed before the challenge")
            return 1
        hello = protocol.encode_body({
            "type": "hello", "protocol": protocol.PROTOCOL_VERSION, "runtime": "rogue/0", "python": "3",
            "pid": os.getpid(), "worker_id": "", "codecs": ["json"], "commands": ["echo"],
            "max_in_flight": 1, "features": [],
        })
        signer = channel._signer
        hello_envelope = signer.envelope(hello)
        channel._sock.send_multipart([hello_envelope] + hello)
        welcome = channel.recv()
        if welcome is None or welcome["type"] != "welcome":
            print("no welcome: %r" % (welcome,))
            return 1
        pong = protocol.encode_body({"type": "pong", "id": 424242})
        if mode == "replay":
            channel._sock.send_multipart([hello_envelope] + hello)
        elif mode == "tamper":
            envelope = signer.envelope(pong)
            body = bytearray(b"".join(pong))
            body[-2] ^= 0x01
            channel._sock.send_multipart([envelope, bytes(body)])
        elif mode == "unsigned":
            channel._sock.send_multipart(pong)
        else:
            print("unknown mode %r" % mode)
            return 2
    # Whatever the pool still sends (pings) is ignored: only the end of the connection counts.
    while True:
        try:
            msg = channel.recv()
        except protocol.ProtocolError as exc:
            print("protocol error: %s" % exc)
            return 1
        except zmq_transport.TransportError as exc:
            print("dropped (%s)" % exc)
            return 0
        if msg is None:
            print("dropped")
            return 0
        if msg["type"] == "reject":
            print("dropped (rejected: %s)" % msg.get("reason"))
            return 0


if __name__ == "__main__":
    sys.exit(main())
