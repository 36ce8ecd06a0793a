"""The protocol echo (pool_testkit::bench::PROTOCOL_ECHO_SERVE): what a worker speaking pypool's
wire format must do per CALL and nothing more. A script appends a line calling
`serve(read, write)`; scripts/replay-reader.py runs the same file."""
import functools, marshal, os, socket, struct, sys
try:
    import msgpack
    loads, dumps, tag = msgpack.unpackb, msgpack.packb, 0x4D
except ImportError:
    loads, tag = marshal.loads, 0x53
    dumps = lambda value, dumps=marshal.dumps: dumps(value, 2)

def echo(value):
    return value

def serve(read, write):
    prefix = struct.Struct(">IBI").pack
    handlers = {"echo": echo}
    write(bytes([tag]))
    buf = b""
    while True:
        data = read()
        if not data:
            return
        buf = buf + data if buf else data
        out = []
        end, size = 0, len(buf)
        while size - end >= 4:
            n = int.from_bytes(buf[end:end + 4], "big")
            if size - end - 4 < n:
                break
            call = loads(buf[end + 9:end + 4 + n])
            value = handlers[call["command"]](**call["args"])
            head = dumps({"type": "result", "id": call["id"], "ok": value})
            out.append(prefix(len(head) + 5, tag, len(head)) + head)
            end += 4 + n
        if end:
            data = b"".join(out)
            while data:
                data = data[write(data):]
            buf = buf[end:]

