"""The physical floor for `pypool bench --baseline` on stdio: no protocol, no pool.

Reads frames (4-byte big-endian length, then that many bytes) on stdin and writes each back
unchanged on stdout, until end of file. The Rust side drives several of these directly.
"""

import struct
import sys


def main():
    read = sys.stdin.buffer.read
    out = sys.stdout.buffer
    while True:
        head = read(4)
        if len(head) < 4:
            return 0
        (length,) = struct.unpack(">I", head)
        body = read(length) if length else b""
        if len(body) < length:
            return 1
        out.write(head + body)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
