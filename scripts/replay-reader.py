#!/usr/bin/env python3
"""What a worker's interpreter does per call, without the kernel or the pool: CALL frames are
replayed through a reader loop in one process (each read hands it one frame, as a strict
call-and-reply exchange does; each write is discarded), and the CPU time per call is taken.

Contenders, each in a fresh interpreter, taking turns in a rotating order:

- ``runtime``: the worker runtime's own reader loop (``Worker._read_forever``), as pypool runs it
  on pipes and sockets.
- ``runtime-bare``: the same loop with the lone-call path cut to the least a worker can do (find
  the handler, call it, encode the reply, write it): no field checks, no inline budget, no write
  lock, no fallbacks. The difference to ``runtime`` is what those guarantees cost.
- ``frame-reader``: no reader loop at all: the runtime's frame reader (``read_alone``, which checks
  the frame and that the message is plain) and the call and reply as ``runtime-bare`` makes them.
  The difference to ``runtime-bare`` is the reader loop's dispatch.
- ``protocol-echo``: the protocol echo of the latency benchmarks
  (``pool-testkit/src/protocol_echo.py``): the wire format and nothing else, no runtime at all.

Run: ``python3 scripts/replay-reader.py [--calls N] [--repeat R]`` with the interpreter to
measure (its codec is the one pypool would pick: msgpack if it can import it, else marshal).
Prints a Markdown table: median of the repeats (min-max) and each median over the protocol
echo's. The replay's own read stub costs about the same in every contender (a slice copy more
for the runtime's ``readinto``), so differences, not absolute figures, are the result.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = ("runtime", "runtime-bare", "frame-reader", "protocol-echo")


def _frames(protocol, codec, calls):
    call = {"type": "call", "command": "echo", "args": {"value": 1}, "timeout_ms": 60000,
            "window": 16}
    return [b"".join(bytes(p) for p in protocol.encode_frame(dict(call, id=i + 1), codec))
            for i in range(calls)]


def _bare_direct(worker, msg):
    """The lone-call path with nothing but the call and its reply."""
    get = msg.get
    call_id = get("id")
    value = worker.handlers[get("command")].fn(**get("args"))
    channel = worker.channel
    channel._writev([channel.encode_plain_result(call_id, value)])
    return True


def _measure(contender, calls):
    """CPU seconds per call of ``contender`` over ``calls`` replayed frames (child process)."""
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from pypool_worker import protocol, runtime

    codec = protocol.MSGPACK if protocol._msgpack is not None else protocol.MARSHAL
    frames = _frames(protocol, codec, calls)
    it = iter(frames)

    class Done(KeyboardInterrupt):  # the one exception the runtime's reader lets through
        pass

    if contender == "protocol-echo":
        scope = {}
        with open(os.path.join(ROOT, "pool-testkit", "src", "protocol_echo.py")) as f:
            exec(compile(f.read(), f.name, "exec"), scope)

        def read():
            frame = next(it, None)
            if frame is None:
                raise Done
            return frame

        def run():
            scope["serve"](read, len)
    else:
        def readinto(view):
            frame = next(it, None)
            if frame is None:
                raise Done
            view[:len(frame)] = frame
            return len(frame)

        def writev(parts):
            return sum(map(len, parts))

        runtime._HANDLERS.clear()
        runtime._register(lambda value: value, "echo")
        channel = runtime._Channel(readinto, writev)
        channel.codec = codec
        worker = runtime.Worker(channel, dict(runtime._HANDLERS), 1)
        if contender == "runtime-bare":
            worker._call_direct = _bare_direct.__get__(worker)
        run = worker._read_forever
        if contender == "frame-reader":
            def run():
                read_alone = channel.read_alone
                while True:
                    _bare_direct(worker, read_alone())

    started = time.process_time()
    try:
        run()
    except Done:
        pass
    return (time.process_time() - started) / calls, codec


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seconds, codec = _measure(args.child, args.calls)
        print(seconds, codec)
        return
    figures = {name: [] for name in CONTENDERS}
    codec = None
    for round_ in range(args.repeat):
        for i in range(len(CONTENDERS)):
            name = CONTENDERS[(round_ + i) % len(CONTENDERS)]
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, "--calls", str(args.calls)],
                check=True, capture_output=True, text=True,
                env=dict(os.environ, PYTHONHASHSEED="0")).stdout.split()
            figures[name].append(float(out[0]) * 1e6)
            codec = out[1]
    base = statistics.median(figures["protocol-echo"])
    print("Replay of %d CALL frames, %s headers, %s, %d repeats; CPU µs per call, median "
          "(min–max)." % (args.calls, codec, sys.version.split()[0], args.repeat))
    print()
    print("| reader loop | µs per call | over the protocol echo |")
    print("|---|---|---|")
    for name in CONTENDERS:
        values = figures[name]
        median = statistics.median(values)
        print("| %s | %.2f (%.2f–%.2f) | %+.2f µs |" % (
            name, median, min(values), max(values), median - base))


if __name__ == "__main__":
    main()
