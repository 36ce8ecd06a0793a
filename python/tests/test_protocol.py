"""Framing and body codec (PROTOCOL.md sections 1 and 2), without any process."""

import array
import collections
import enum
import json
import marshal
import os
import struct
import unittest

import wire  # noqa: F401  (puts the package on sys.path)
from pypool_worker import protocol
from pypool_worker.protocol import FrameTooLarge, ProtocolError

try:
    import msgpack
except ImportError:
    msgpack = None


def roundtrip(header, codec=protocol.JSON):
    parts = protocol.encode_frame(header, codec)
    data = b"".join(bytes(p) for p in parts)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    return protocol.decode_body(data[4:])


def reader_over(data):
    """A readinto() over ``data`` that records how much each call asked for."""
    view = memoryview(data)
    state = {"pos": 0, "asked": []}

    def readinto(buf):
        state["asked"].append(len(buf))
        n = min(len(buf), len(view) - state["pos"], 7)  # short reads, like a pipe
        buf[:n] = view[state["pos"]:state["pos"] + n]
        state["pos"] += n
        return n

    return readinto, state


def body(codec_byte, header_bytes, attachments=b""):
    return bytes([codec_byte]) + struct.pack(">I", len(header_bytes)) + header_bytes + attachments


class JsonCodecTest(unittest.TestCase):
    def test_plain_values_roundtrip(self):
        value = {"s": "héllo ✓", "i": 2 ** 52, "neg": -3, "f": 1.5, "n": None, "t": True,
                 "l": [1, [2, {"x": []}]], "empty": {}}
        out = roundtrip({"type": "result", "id": 1, "ok": value})
        self.assertEqual(out["ok"], value)
        self.assertNotIn("att", out)

    def test_bytes_become_attachments_and_come_back_as_bytes(self):
        data = bytes(range(256)) * 10
        value = {"a": data, "b": [bytearray(b"xy"), memoryview(b"\x00\x01\x02")], "c": b""}
        parts = protocol.encode_frame({"type": "result", "id": 2, "ok": value})
        header = json.loads(bytes(parts[0])[9:].decode("utf-8"))
        self.assertEqual(header["att"], [2560, 2, 3, 0])
        self.assertEqual(header["ok"]["a"], {"__pypool_att__": 0})
        self.assertEqual(header["ok"]["b"], [{"__pypool_att__": 1}, {"__pypool_att__": 2}])
        # large byte strings are passed through as the caller's object, not copied
        self.assertIs(parts[1], data)
        out = roundtrip({"type": "result", "id": 2, "ok": value})
        self.assertEqual(out["ok"], {"a": data, "b": [b"xy", b"\x00\x01\x02"], "c": b""})
        self.assertIs(type(out["ok"]["b"][0]), bytes)

    def test_memoryview_of_wider_items_is_sent_as_its_bytes(self):
        ints = array.array("i", [1, 2, 3])
        out = roundtrip({"type": "result", "id": 3, "ok": memoryview(ints)})
        self.assertEqual(out["ok"], ints.tobytes())
        strided = memoryview(b"abcdef")[::2]
        self.assertEqual(roundtrip({"type": "result", "id": 4, "ok": strided})["ok"], b"ace")

    def test_protocol_md_example_bytes(self):
        # PROTOCOL.md section 8, computed rather than copied: its printed lengths are off.
        header = b'{"type":"call","id":7,"command":"echo","args":{"data":{"__pypool_att__":0}},"att":[2]}'
        expected_body = body(0x4A, header, b"\x00\x01")
        expected = struct.pack(">I", len(expected_body)) + expected_body
        msg = {"type": "call", "id": 7, "command": "echo", "args": {"data": b"\x00\x01"}}
        self.assertEqual(b"".join(bytes(p) for p in protocol.encode_frame(msg)), expected)
        decoded = protocol.decode_body(expected_body)
        self.assertEqual(decoded["args"], {"data": b"\x00\x01"})

    def test_unencodable_values_raise_before_anything_is_written(self):
        with self.assertRaises(TypeError):
            protocol.encode_frame({"type": "result", "id": 1, "ok": {1, 2}})
        with self.assertRaises(ValueError):
            protocol.encode_frame({"type": "result", "id": 1, "ok": float("nan")})

    def test_frame_larger_than_max_frame_is_refused(self):
        msg = {"type": "result", "id": 1, "ok": b"x" * 1000}
        with self.assertRaises(FrameTooLarge):
            protocol.encode_frame(msg, max_frame=1000)
        protocol.encode_frame(msg, max_frame=2000)


class MarshalCodecTest(unittest.TestCase):
    def test_roundtrip(self):
        value = {"s": "héllo", "i": 2 ** 52, "f": 0.25, "n": None, "l": [1, 2, {"t": False}],
                 "big": -2 ** 63}
        out = roundtrip({"type": "result", "id": 1, "ok": value}, protocol.MARSHAL)
        self.assertEqual(out["ok"], value)

    def test_the_header_is_marshal_version_2(self):
        parts = protocol.encode_frame({"type": "pong", "id": 3}, protocol.MARSHAL)
        raw = bytes(parts[0])
        self.assertEqual(raw[4], 0x53)
        self.assertEqual(raw[9:], marshal.dumps({"type": "pong", "id": 3}, 2))

    def test_bytes_are_attachments(self):
        msg = {"type": "chunk", "id": 1, "seq": 0, "value": (b"abc", bytearray(b"de"))}
        raw = bytes(protocol.encode_frame(msg, protocol.MARSHAL)[0])
        header = marshal.loads(raw[9:])
        self.assertEqual(header["value"], [{"__pypool_att__": 0}, {"__pypool_att__": 1}])
        self.assertEqual(header["att"], [3, 2])
        self.assertEqual(roundtrip(msg, protocol.MARSHAL)["value"], [b"abc", b"de"])

    def test_values_read_as_json_would_write_them(self):
        class Level(enum.IntEnum):
            HIGH = 3

        class Name(str):
            pass

        value = {3: "a", 2.5: "b", True: "c", None: "d", "e": Level.HIGH, "f": Name("x"),
                 "g": collections.OrderedDict(h=(1, 2)), "i": [Level.HIGH]}
        json_out = roundtrip({"type": "result", "id": 1, "ok": value})["ok"]
        marshal_out = roundtrip({"type": "result", "id": 1, "ok": value}, protocol.MARSHAL)["ok"]
        self.assertEqual(json_out, marshal_out)
        self.assertIs(type(marshal_out["e"]), int)

    def test_what_json_refuses_it_refuses(self):
        for value in ([float("nan")], {"x": object()}, {1, 2}):
            with self.subTest(value=value), self.assertRaises((ValueError, TypeError)):
                protocol.encode_frame({"type": "result", "id": 1, "ok": value}, protocol.MARSHAL)

    def test_results_of_plain_values_match_the_general_encoding(self):
        for value in (None, True, 7, -2 ** 63, "text"):
            fast = b"".join(bytes(p) for p in protocol.encode_result(5, value, protocol.MARSHAL))
            general = b"".join(bytes(p) for p in protocol.encode_frame(
                {"type": "result", "id": 5, "ok": value}, protocol.MARSHAL))
            self.assertEqual(fast, general)
        with self.assertRaises(FrameTooLarge):
            protocol.encode_result(5, "x" * 100, protocol.MARSHAL, max_frame=50)

    def test_bad_headers(self):
        for header in (b"\x00", marshal.dumps([1, 2]), marshal.dumps({"id": 1}),
                       marshal.dumps({"type": 3})):
            with self.subTest(header=header), self.assertRaises(ProtocolError):
                protocol.decode_body(body(0x53, header))

    def test_a_placeholder_without_attachments_is_refused(self):
        header = marshal.dumps({"type": "call", "args": {"__pypool_att__": 0}}, 2)
        with self.assertRaises(ProtocolError):
            protocol.decode_body(body(0x53, header))


@unittest.skipIf(msgpack is None, "msgpack is not installed")
class MsgpackCodecTest(unittest.TestCase):
    def test_roundtrip(self):
        value = {"s": "héllo", "i": 2 ** 52, "f": 0.25, "n": None, "l": [1, 2, {"t": False}]}
        out = roundtrip({"type": "result", "id": 1, "ok": value}, protocol.MSGPACK)
        self.assertEqual(out["ok"], value)

    def test_bytes_are_attachments_not_inline_bin(self):
        msg = {"type": "chunk", "id": 1, "seq": 0, "value": (b"abc", bytearray(b"de"))}
        parts = protocol.encode_frame(msg, protocol.MSGPACK)
        raw = bytes(parts[0])
        self.assertEqual(raw[4], 0x4D)
        header = msgpack.unpackb(raw[9:], raw=False)
        self.assertEqual(header["value"], [{"__pypool_att__": 0}, {"__pypool_att__": 1}])
        self.assertEqual(header["att"], [3, 2])
        self.assertEqual(roundtrip(msg, protocol.MSGPACK)["value"], [b"abc", b"de"])

    def test_non_string_keys_match_json(self):
        value = {3: "a", 2.5: "b", True: "c", None: "d"}
        json_out = roundtrip({"type": "result", "id": 1, "ok": value})["ok"]
        mp_out = roundtrip({"type": "result", "id": 1, "ok": value}, protocol.MSGPACK)["ok"]
        self.assertEqual(json_out, mp_out)

    def test_nan_is_refused_like_json(self):
        with self.assertRaises(ValueError):
            protocol.encode_frame({"type": "result", "id": 1, "ok": [float("inf")]},
                                  protocol.MSGPACK)

    def test_results_of_plain_values_match_the_general_encoding(self):
        for value in (None, True, 7, -2 ** 63, "text"):
            fast = b"".join(bytes(p) for p in protocol.encode_result(5, value, protocol.MSGPACK))
            general = b"".join(bytes(p) for p in protocol.encode_frame(
                {"type": "result", "id": 5, "ok": value}, protocol.MSGPACK))
            self.assertEqual(msgpack.unpackb(fast[9:]), msgpack.unpackb(general[9:]))
            self.assertEqual(fast[:5], general[:5])
        with self.assertRaises(FrameTooLarge):
            protocol.encode_result(5, "x" * 100, protocol.MSGPACK, max_frame=50)

    def test_bad_headers(self):
        for header in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"id": 1}),
                       msgpack.packb({"type": 3})):
            with self.subTest(header=header), self.assertRaises(ProtocolError):
                protocol.decode_body(body(0x4D, header))

    def test_a_placeholder_without_attachments_is_refused(self):
        header = msgpack.packb({"type": "call", "args": {"__pypool_att__": 0}})
        with self.assertRaises(ProtocolError):
            protocol.decode_body(body(0x4D, header))


class DecodeErrorsTest(unittest.TestCase):
    def assertBad(self, data):
        with self.assertRaises(ProtocolError):
            protocol.decode_body(data)

    def test_short_body(self):
        self.assertBad(b"J\x00\x00")

    def test_unknown_codec_byte(self):
        self.assertBad(body(0x58, b'{"type":"ping","id":1}'))

    def test_header_longer_than_body(self):
        self.assertBad(b"J\x00\x00\x00\x50{}")

    def test_bad_json(self):
        self.assertBad(body(0x4A, b'{"type":'))

    def test_header_not_a_map(self):
        self.assertBad(body(0x4A, b'[1,2]'))

    def test_missing_type(self):
        self.assertBad(body(0x4A, b'{"id":1}'))

    def test_attachment_lengths_must_add_up(self):
        self.assertBad(body(0x4A, b'{"type":"call","att":[3]}', b"ab"))
        self.assertBad(body(0x4A, b'{"type":"call","att":[1]}', b"ab"))
        self.assertBad(body(0x4A, b'{"type":"call"}', b"ab"))
        self.assertBad(body(0x4A, b'{"type":"call","att":[-1]}', b""))
        self.assertBad(body(0x4A, b'{"type":"call","att":"2"}', b"ab"))

    def test_placeholder_out_of_range(self):
        self.assertBad(body(0x4A, b'{"type":"call","args":{"__pypool_att__":1},"att":[1]}', b"a"))
        self.assertBad(body(0x4A, b'{"type":"call","args":[{"__pypool_att__":0}]}'))

    def test_header_not_utf8(self):
        self.assertBad(body(0x4A, b'{"type":"\xff"}'))

    def test_whitespace_around_the_header_is_json_still(self):
        self.assertEqual(protocol.decode_body(body(0x4A, b' {"type": "ping", "id": 1}\n')),
                         {"type": "ping", "id": 1})

    def test_map_with_more_keys_is_not_a_placeholder(self):
        header = b'{"type":"call","args":{"__pypool_att__":0,"x":1}}'
        self.assertEqual(protocol.decode_body(body(0x4A, header))["args"],
                         {"__pypool_att__": 0, "x": 1})


def reads_of(*chunks):
    """A readinto() that returns ``chunks`` one per call (then the end of the stream)."""
    pending = [memoryview(bytes(c)) for c in chunks]

    def readinto(buf):
        if not pending:
            return 0
        chunk = pending.pop(0)
        buf[:len(chunk)] = chunk
        return len(chunk)

    return readinto


def frame(header, codec=protocol.JSON):
    return b"".join(bytes(p) for p in protocol.encode_frame(header, codec))


class ReadAloneTest(unittest.TestCase):
    """FrameReader.read_alone: the usual frame of a call-and-reply exchange, or nothing
    consumed, so that read() returns the frame as it always did."""

    def test_a_lone_plain_frame_is_decoded(self):
        for codec in (protocol.JSON, protocol.MARSHAL):
            with self.subTest(codec=codec):
                reader = protocol.FrameReader(reads_of(frame({"type": "ping", "id": 1}, codec)))
                self.assertEqual(reader.read_alone(), {"type": "ping", "id": 1})
                self.assertIsNone(reader.read_alone())  # the end of the stream
                self.assertIsNone(reader.read())

    def test_anything_else_is_left_for_read(self):
        one = frame({"type": "ping", "id": 1})
        two = frame({"type": "ping", "id": 2})
        with_bytes = frame({"type": "ping", "id": 3, "v": b"ab"})
        cases = {
            "two frames in one read": ([one + two], [one, two]),
            "half a frame": ([one[:6], one[6:]], [one]),
            "attachments": ([with_bytes], [with_bytes]),
            "not a plain header": ([b"\x00\x00\x00\x06J\x00\x00\x00\x01["], None),
        }
        for name, (chunks, frames) in cases.items():
            with self.subTest(name):
                reader = protocol.FrameReader(reads_of(*chunks))
                self.assertIsNone(reader.read_alone())
                if frames is None:
                    with self.assertRaises(ProtocolError):
                        protocol.decode_body(reader.read())
                    continue
                for f in frames:
                    self.assertEqual(bytes(reader.read()), f[4:])
                self.assertIsNone(reader.read())

    def test_a_read_that_filled_the_buffer_is_not_alone(self):
        big = frame({"type": "ping", "id": 1, "pad": "x" * 60})
        reader = protocol.FrameReader(reads_of(big), buffer_size=len(big))
        self.assertIsNone(reader.read_alone())  # more may have been waiting behind it
        self.assertEqual(protocol.decode_body(reader.read())["id"], 1)

    def test_plain_results_are_one_buffer_in_every_codec(self):
        codecs = [protocol.JSON, protocol.MARSHAL] + ([protocol.MSGPACK] if msgpack else [])
        for codec in codecs:
            for value in (None, False, -7, 2 ** 63, "x\"é"):
                with self.subTest(codec=codec, value=value):
                    data = protocol.encode_plain_result(9, value, codec)
                    self.assertIsInstance(data, bytes)
                    self.assertEqual(protocol.decode_body(data[4:]),
                                     {"type": "result", "id": 9, "ok": value})
            self.assertIsNone(protocol.encode_plain_result(9, [1], codec))
            self.assertIsNone(protocol.encode_plain_result(9, 1.5, codec))
            with self.assertRaises(FrameTooLarge):
                protocol.encode_plain_result(9, "x" * 100, codec, max_frame=60)


class FramingTest(unittest.TestCase):
    def test_reads_frames_across_short_reads(self):
        frames = [b"".join(bytes(p) for p in protocol.encode_frame(
            {"type": "ping", "id": i, "pad": "x" * i * 5})) for i in range(4)]
        readinto, _ = reader_over(b"".join(frames))
        for i in range(4):
            self.assertEqual(protocol.decode_body(protocol.read_frame(readinto))["id"], i)
        self.assertIsNone(protocol.read_frame(readinto))

    def test_oversize_length_is_rejected_before_reading_the_body(self):
        data = struct.pack(">I", 1 << 31) + b"J"
        readinto, state = reader_over(data)
        with self.assertRaisesRegex(ProtocolError, "exceeds max_frame"):
            protocol.read_frame(readinto, max_frame=1 << 20)
        # only the 4 length bytes were asked for: no buffer for the body was made
        self.assertEqual(sum(state["asked"][:1]), 4)
        self.assertEqual(state["pos"], 4)

    def test_zero_length_frame(self):
        readinto, _ = reader_over(b"\x00\x00\x00\x00")
        with self.assertRaises(ProtocolError):
            protocol.read_frame(readinto)

    def test_truncated_frames(self):
        for data in (b"\x00\x00", b"\x00\x00\x00\x10J\x00"):
            readinto, _ = reader_over(data)
            with self.assertRaises(ProtocolError):
                protocol.read_frame(readinto)

    def test_frame_reader_cuts_many_frames_out_of_one_read(self):
        frames = [b"".join(bytes(p) for p in protocol.encode_frame(
            {"type": "ping", "id": i, "pad": "x" * (i * 37 % 300)})) for i in range(200)]
        data = b"".join(frames)
        calls = []

        def readinto(buf):  # hands out everything it has, like a pipe with queued frames
            n = min(len(buf), len(data) - state["pos"])
            buf[:n] = data[state["pos"]:state["pos"] + n]
            state["pos"] += n
            calls.append(n)
            return n

        state = {"pos": 0}
        reader = protocol.FrameReader(readinto, buffer_size=1000)
        for i in range(200):
            self.assertEqual(protocol.decode_body(reader.read())["id"], i)
        self.assertIsNone(reader.read())
        self.assertLess(len(calls), 200)  # fewer reads than frames

    def test_frame_reader_across_short_reads_and_large_frames(self):
        sizes = [0, 5, 2000, 1, 70000, 3, 999, 1000, 1001]
        frames = [b"".join(bytes(p) for p in protocol.encode_frame(
            {"type": "chunk", "id": i, "seq": 0, "value": b"\xab" * n}))
            for i, n in enumerate(sizes)]
        readinto, _ = reader_over(b"".join(frames))  # at most 7 bytes per read
        reader = protocol.FrameReader(readinto, buffer_size=1024)
        for i, n in enumerate(sizes):
            msg = protocol.decode_body(reader.read())
            self.assertEqual((msg["id"], msg["value"]), (i, b"\xab" * n))
        self.assertIsNone(reader.read())

    def test_frame_reader_knows_when_a_read_emptied_a_real_pipe(self):
        small = b"".join(bytes(p) for p in protocol.encode_frame({"type": "ping", "id": 1}))
        r, w = os.pipe()
        try:
            reader = protocol.FrameReader(lambda buf: os.readv(r, [buf]), buffer_size=64)
            os.write(w, small)
            self.assertEqual(protocol.decode_body(reader.read())["id"], 1)
            self.assertTrue(reader.drained)  # the read got less than it asked: pipe empty
            os.write(w, small * 20)  # more than the buffer holds: the read fills it
            self.assertEqual(protocol.decode_body(reader.read())["id"], 1)
            self.assertFalse(reader.drained)
            for _ in range(19):
                reader.read()
            self.assertTrue(reader.drained)
        finally:
            os.close(r)
            os.close(w)

    def test_frame_reader_rejects_oversize_before_allocating(self):
        readinto, state = reader_over(struct.pack(">I", 1 << 31) + b"J")
        reader = protocol.FrameReader(readinto, max_frame=1 << 20, buffer_size=64)
        with self.assertRaisesRegex(ProtocolError, "exceeds max_frame"):
            reader.read()
        self.assertEqual(state["pos"], 5)  # read what the pipe offered, allocated nothing more

    def test_frame_reader_errors(self):
        for data in (b"\x00\x00\x00\x00", b"\x00\x00", b"\x00\x00\x00\x10J\x00"):
            with self.subTest(data=data):
                readinto, _ = reader_over(data)
                with self.assertRaises(ProtocolError):
                    protocol.FrameReader(readinto).read()
        readinto, _ = reader_over(b"\x00\x00\x90\x00J\x00")  # large frame cut short
        with self.assertRaises(ProtocolError):
            protocol.FrameReader(readinto, buffer_size=64).read()

    def test_write_all_finishes_a_first_partial_writev(self):
        out = bytearray()
        limits = [3, 100, 100, 100]

        def writev(bufs):
            budget = limits.pop(0)
            n = 0
            for b in bufs:
                take = min(len(b), budget - n)
                out.extend(bytes(b[:take]))
                n += take
                if n == budget:
                    break
            return n

        protocol.write_all(writev, [b"ab", b"", b"cdef", bytearray(b"g")])
        self.assertEqual(bytes(out), b"abcdefg")

    def test_write_all_finishes_one_buffer_written_in_parts(self):
        out = bytearray()

        def writev(bufs):
            self.assertEqual(len(bufs), 1)
            out.extend(bytes(bufs[0][:3]))
            return min(3, len(bufs[0]))

        protocol.write_all(writev, [b"abcdefgh"])
        self.assertEqual(bytes(out), b"abcdefgh")
        with self.assertRaises(BrokenPipeError):
            protocol.write_all(lambda bufs: 0, [b"abc"])

    def test_write_all_survives_partial_writes(self):
        out = bytearray()
        calls = []

        def writev(bufs):
            calls.append(len(bufs))
            n = 0
            for b in bufs:  # accept at most 5 bytes per call
                take = min(len(b), 5 - n)
                out.extend(bytes(b[:take]))
                n += take
                if n == 5:
                    break
            return n

        parts = [b"hello world", bytearray(b"!!"), b"", memoryview(b"0123456789")[2:8]]
        protocol.write_all(writev, parts)
        self.assertEqual(bytes(out), b"hello world!!234567")
        self.assertGreater(len(calls), 3)

    def test_write_all_respects_iov_max(self):
        seen = []

        def writev(bufs):
            seen.append(len(bufs))
            return sum(len(b) for b in bufs)

        protocol.write_all(writev, [b"x"] * (protocol._IOV_MAX * 2 + 3))
        self.assertTrue(all(n <= protocol._IOV_MAX for n in seen))
        self.assertEqual(sum(seen), protocol._IOV_MAX * 2 + 3)


if __name__ == "__main__":
    unittest.main()
