"""``__main__`` of the stand-in runtime zmq_bench starts through ZmqLauncher: it joins the pool
exactly like a worker (JOIN / CHALLENGE / AUTH, with the secret from the inherited pipe), then,
instead of serving the protocol, echoes every message, so the bench times the pool's channel
without the runtime's per-call work.

PYPOOL_BENCH_ECHO=plain    blocking recv/send on the pyzmq socket (as the pyzmq baseline does)
PYPOOL_BENCH_ECHO=channel  through the runtime's channel: the lock, ZMQ_FD polling and wake-up
                           pipe that let one thread read while others write

On tcp:// every message is checked and signed, as the runtime does.
"""

import os

from pypool_worker import runtime, zmq_transport

channel = zmq_transport.open_channel(runtime._take_secret())
signer = channel._signer
if os.environ.get("PYPOOL_BENCH_ECHO") == "plain":
    recv, send = channel._sock.recv_multipart, channel._sock.send_multipart
    while True:
        frames = recv()
        if signer is not None:
            body = signer.check(frames)
            frames = [signer.envelope(body)] + body
        send(frames)
else:
    while True:
        frames = channel._recv_frames()
        if frames is None:
            break
        if signer is not None:
            frames = signer.check(frames)
        channel._write(frames)
