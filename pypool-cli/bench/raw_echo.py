"""The physical floor for `pypool bench --baseline`: no protocol, no pool.

Reads frames (4-byte big-endian length, then that many bytes) and writes each back unchanged,
until end of file: on stdin/stdout (the stdio floor), or, with `--socket PATH`, on a Unix socket
it connects to (the ipc floor). The Rust side drives several of these directly.
"""

import socket
import struct
import sys


def serve(read, write):
    while True:
        head = read(4)
        if len(head) < 4:
            return 0
        (length,) = struct.unpack(">I", head)
        body = read(length) if length else b""
        if len(body) < length:
            return 1
        write(head + body)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sys.argv[2])
        stream = sock.makefile("rb")
        return serve(stream.read, sock.sendall)
    out = sys.stdout.buffer

    def write(data):
        out.write(data)
        out.flush()

    return serve(sys.stdin.buffer.read, write)


if __name__ == "__main__":
    sys.exit(main())
