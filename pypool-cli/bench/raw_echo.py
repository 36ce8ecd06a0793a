"""The physical floor for `pypool bench --baseline`: no protocol, no pool.

Echoes length-prefixed frames (4-byte big-endian length, then that many bytes) until end of
file: on stdin/stdout (the stdio floor), or, with `--socket PATH`, on a Unix socket it connects
to (the ipc floor). It is the least a Python process can do per frame: it reads everything that
has arrived, finds the complete frames by their lengths, and writes them all back with one
write, so that the Rust side may keep several frames in flight (pipelining), as pypool keeps
several calls queued at a worker. The Rust side drives several of these directly.
"""

import functools
import os
import socket
import sys


def serve(read, write):
    buf = b""
    while True:
        data = read(1 << 16)
        if not data:
            return 1 if buf else 0
        buf = buf + data if buf else data
        end, size = 0, len(buf)
        while size - end >= 4:
            frame = 4 + int.from_bytes(buf[end : end + 4], "big")
            if size - end < frame:
                break
            end += frame
        if end:
            write(buf[:end] if end < size else buf)
            buf = buf[end:]


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sys.argv[2])
        return serve(sock.recv, sock.sendall)

    def write(data):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]

    return serve(functools.partial(os.read, 0), write)


if __name__ == "__main__":
    sys.exit(main())
