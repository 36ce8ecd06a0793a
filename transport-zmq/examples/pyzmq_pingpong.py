"""The baseline for zmq_bench: plain pyzmq on both ends, the strongest simple usage.

  pyzmq_pingpong.py echo ENDPOINT IDENTITY
      a DEALER with IDENTITY connects to ENDPOINT, says "ready", then echoes every message
      (blocking recv_multipart / send_multipart, copying small messages: pyzmq's fastest path
      for messages this size).

  pyzmq_pingpong.py drive ENDPOINT ROUNDS WARMUP SIZE
      binds a ROUTER at ENDPOINT, starts the echo above as a separate process, and times ROUNDS
      sequential ping-pongs of SIZE bytes after WARMUP untimed ones. Prints one JSON object:
      {"mean": us, "p50": us, "p99": us, "rounds": n}.

  pyzmq_pingpong.py blocks ENDPOINT SIZE
      the same set-up, driven from stdin: prints the endpoint, then for every line "K" times K
      ping-pongs and prints their round-trip times in microseconds as one JSON list; ends at
      end of input. zmq_bench interleaves these blocks with its other rows.
"""

import json
import subprocess
import sys
import time

import zmq


def echo(endpoint, identity):
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(b"ready")
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        msg = recv()
        if msg == [b"stop"]:
            break
        send(msg)
    sock.close(0)
    ctx.term()


def drive(endpoint, rounds, warmup, size):
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)  # tcp://127.0.0.1:* picks a free port
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    child = subprocess.Popen([sys.executable, __file__, "echo", endpoint, "echo-peer"])
    try:
        identity, hello = sock.recv_multipart()
        assert hello == b"ready", hello
        payload = bytes(size)
        send, recv = sock.send_multipart, sock.recv_multipart
        frames = [identity, payload]
        samples = []
        clock = time.perf_counter_ns
        for i in range(warmup + rounds):
            t = clock()
            send(frames)
            recv()
            if i >= warmup:
                samples.append((clock() - t) / 1000.0)
        send([identity, b"stop"])
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        sock.close(0)
        ctx.term()
    samples.sort()
    print(json.dumps({
        "mean": sum(samples) / len(samples),
        "p50": samples[len(samples) // 2],
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "rounds": len(samples),
    }))


def blocks(endpoint, size):
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    child = subprocess.Popen([sys.executable, __file__, "echo", endpoint, "echo-peer"])
    try:
        identity, hello = sock.recv_multipart()
        assert hello == b"ready", hello
        frames = [identity, bytes(size)]
        send, recv = sock.send_multipart, sock.recv_multipart
        clock = time.perf_counter_ns
        print(endpoint, flush=True)
        for line in sys.stdin:
            samples = []
            for _ in range(int(line)):
                t = clock()
                send(frames)
                recv()
                samples.append((clock() - t) // 1000)
            print(json.dumps(samples), flush=True)
        send([identity, b"stop"])
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        sock.close(0)
        ctx.term()


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "blocks":
        blocks(sys.argv[2], int(sys.argv[3]))
    else:
        drive(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
