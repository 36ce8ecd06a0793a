"""pypool wire protocol v2: framing and body codec (see PROTOCOL.md).

A frame is ``u32 BE length`` + body; a body is ``codec byte`` + ``u32 BE header_len`` + header +
attachments. Byte strings inside values never go through the header codec: they travel as raw
attachments and the header holds ``{"__pypool_att__": N}`` in their place.

This module is pure stdlib (msgpack is used only when importable) and has no state, so both the
worker and the tests use it.
"""

import functools
import json
import json.decoder
import json.encoder
import marshal
import math
import os
import struct
import threading

try:  # optional: the pool picks msgpack only when both sides announce it
    import msgpack as _msgpack
except ImportError:  # pragma: no cover - depends on the environment
    _msgpack = None

PROTOCOL_VERSION = 2

JSON = "json"
MSGPACK = "msgpack"
# Python's own marshal format, version 2 (no back-references), for the subset of types a header
# holds: the binary codec every interpreter has. Frames come only from the pool this worker
# serves (and are authenticated where they cross a network), which marshal.loads requires.
MARSHAL = "marshal"
_MARSHAL_VERSION = 2
_CODEC_BYTE = {JSON: 0x4A, MSGPACK: 0x4D, MARSHAL: 0x53}
_BYTE_CODEC = {v: k for k, v in _CODEC_BYTE.items()}

DEFAULT_MAX_FRAME = 256 * 1024 * 1024
ATT_KEY = "__pypool_att__"

_LEN = struct.Struct(">I")
_unpack_len = _LEN.unpack_from
_BODY_PREFIX = struct.Struct(">BI")  # codec byte, header length
_FRAME_PREFIX = struct.Struct(">IBI")  # frame length, codec byte, header length
_ATT_KEY_BYTES = ATT_KEY.encode("ascii")

try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _IOV_MAX = 1024
if _IOV_MAX <= 0:  # pragma: no cover - "no limit" is reported as -1 on some systems
    _IOV_MAX = 1024


class ProtocolError(Exception):
    """The peer sent something that is not valid protocol; the channel cannot continue."""


class FrameTooLarge(ValueError):
    """An outgoing frame would exceed the negotiated ``max_frame``."""


class BadCall(ProtocolError):
    """A well-formed CALL whose arguments cannot be used (an attachment placeholder that names
    no attachment). Only that call fails: ``header`` holds its id."""

    def __init__(self, header, message):
        super().__init__(message)
        self.header = header


# Errors raised by this package are reported under the public package name.
ProtocolError.__module__ = "pypool_worker"
FrameTooLarge.__module__ = "pypool_worker"


def available_codecs():
    """Codecs this interpreter can read and write, for HELLO."""
    return [JSON, MARSHAL, MSGPACK] if _msgpack is not None else [JSON, MARSHAL]


# --------------------------------------------------------------------------------------------
# Encoding


def _as_attachment(value):
    """Return a buffer that os.writev/sendmsg can write without copying, or a copy if it must."""
    if isinstance(value, memoryview):
        if value.c_contiguous:
            # cast() gives a flat byte view, so len() is the byte count whatever the item format.
            return value.cast("B") if (value.ndim != 1 or value.format != "B") else value
        return value.tobytes()
    return value  # bytes and bytearray are written as they are


def _binary_key(key):
    # Mirror what json.dumps does with non-string keys, so a handler's result means the same
    # thing under every codec (the pool's values are JSON-shaped: string keys only).
    if isinstance(key, str):
        return str(key)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, (int, float)):
        return json.dumps(key)
    raise TypeError("keys must be str, int, float, bool or None, not %s" % type(key).__name__)


# Types the binary codecs encode as they are, with nothing to move to the attachments: a container
# of only these is checked at C speed (``issuperset(map(type, ...))``) instead of copied item by
# item.
_PLAIN = frozenset((str, int, bool, type(None)))


def _extract_for_binary(value, atts):
    """``value`` as msgpack and marshal take it, and as JSON would write it: byte strings
    replaced by attachment placeholders (those codecs would inline them), keys made strings,
    non-finite floats refused, and subclasses of the built-in types (an IntEnum, an OrderedDict)
    made their base type (marshal takes the exact types only). Containers with nothing to change
    are not copied (a map's batch of results)."""
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return value
    if t is float:
        if not math.isfinite(value):
            raise ValueError("Out of range float values are not JSON compliant")
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        atts.append(_as_attachment(value))
        return {ATT_KEY: len(atts) - 1}
    if isinstance(value, dict):
        if t is dict and _PLAIN.issuperset(map(type, value.values())) and all(
                type(k) is str for k in value):
            return value
        return {_binary_key(k): _extract_for_binary(v, atts) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if (t is list or t is tuple) and _PLAIN.issuperset(map(type, value)):
            return value if t is list else list(value)  # marshal would keep a tuple a tuple
        return [_extract_for_binary(v, atts) for v in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _extract_for_binary(float(value), atts)
    if isinstance(value, str):
        return str(value)
    raise TypeError("Object of type %s is not serializable" % t.__name__)


# One JSON encoder for every header, built once: json.dumps and JSONEncoder.encode build a new C
# encoder on every call, which costs more than encoding a small header. Byte strings are moved
# to the attachments as the encoder meets them (its ``default`` hook), into the list the current
# thread set up: one pass over the value, bytes or not. No circular-reference check: a value
# that contains itself fails with RecursionError (reported as the call's error) instead.
# allow_nan=False: NaN/Infinity are not JSON and would make the pool drop the worker.
_encoding = threading.local()


def _collect_bytes(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        atts = _encoding.atts
        atts.append(_as_attachment(obj))
        return {ATT_KEY: len(atts) - 1}
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


if json.encoder.c_make_encoder is not None:  # CPython's C accelerator
    _json_chunks = json.encoder.c_make_encoder(
        None, _collect_bytes, json.encoder.encode_basestring, None, ":", ",", False, False,
        False)

    def _encode_json(value):
        return "".join(_json_chunks(value, 0))
else:  # pragma: no cover - other interpreters
    _encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                                    check_circular=False, default=_collect_bytes).encode


def _encode_header(header, codec):
    """(encoded header, attachments): attachments are the caller's objects, never copied."""
    atts = []
    if codec == JSON:
        _encoding.atts = atts
        try:
            text = _encode_json(header)
        finally:
            _encoding.atts = None
        if atts:
            # The lengths are only known after encoding: append the tiny tail.
            text = "%s,\"att\":[%s]}" % (text[:-1], ",".join([str(_nbytes(a)) for a in atts]))
        return text.encode("utf-8"), atts
    if codec == MSGPACK:
        if _msgpack is None:
            raise ProtocolError("msgpack codec requested but msgpack is not installed")
        header = _extract_for_binary(header, atts)
        if atts:
            header["att"] = [_nbytes(a) for a in atts]
        return _msgpack.packb(header, use_bin_type=True), atts
    if codec == MARSHAL:
        header = _extract_for_binary(header, atts)
        if atts:
            header["att"] = [_nbytes(a) for a in atts]
        return marshal.dumps(header, _MARSHAL_VERSION), atts
    raise ValueError("unknown codec %r" % (codec,))


def encode_body(header, codec=JSON):
    """Encode one message; return the list of buffers making up the body (no frame prefix).

    The first buffer is the codec byte + header length + header; the rest are attachments, kept
    as the caller's objects so that large byte strings are never copied.
    """
    head, atts = _encode_header(header, codec)
    return [_BODY_PREFIX.pack(_CODEC_BYTE[codec], len(head)) + head] + atts


def encode_frame(header, codec=JSON, max_frame=DEFAULT_MAX_FRAME):
    """Encode one message as a list of buffers: the whole frame, length prefix included.

    Raises FrameTooLarge (before anything is written) if the body would exceed ``max_frame``.
    """
    head, atts = _encode_header(header, codec)
    size = 5 + len(head)
    for att in atts:
        size += _nbytes(att)
    if size > max_frame:
        raise FrameTooLarge("%s message of %d bytes exceeds max_frame %d"
                            % (header.get("type", "?"), size, max_frame))
    return [_FRAME_PREFIX.pack(size, _CODEC_BYTE[codec], len(head)) + head] + atts


_JSON_SCALAR = {type(None): lambda v: "null", bool: lambda v: "true" if v else "false",
                int: int.__repr__, str: lambda v: _encode_json(v)}


def encode_plain_result(call_id, value, codec=JSON, max_frame=DEFAULT_MAX_FRAME):
    """The whole frame of ``{"type": "result", "id": call_id, "ok": value}`` as one ``bytes``
    when ``value`` is a plain scalar (None, bool, int, str: nothing to check or move to the
    attachments), else None. FrameTooLarge if it would exceed ``max_frame``."""
    if type(value) not in _PLAIN:
        return None
    if codec == JSON:
        head = ('{"type":"result","id":%d,"ok":%s}'
                % (call_id, _JSON_SCALAR[type(value)](value))).encode()
    elif codec == MARSHAL:
        head = marshal.dumps({"type": "result", "id": call_id, "ok": value}, _MARSHAL_VERSION)
    elif codec == MSGPACK:
        head = _msgpack.packb({"type": "result", "id": call_id, "ok": value})
    else:
        return None
    size = 5 + len(head)
    if size > max_frame:
        raise FrameTooLarge("result message of %d bytes exceeds max_frame %d" % (size, max_frame))
    return _FRAME_PREFIX.pack(size, _CODEC_BYTE[codec], len(head)) + head


def encode_result(call_id, value, codec=JSON, max_frame=DEFAULT_MAX_FRAME):
    """``encode_frame`` of ``{"type": "result", "id": call_id, "ok": value}``, faster: a reply is
    sent for every call, and most values are small."""
    frame = encode_plain_result(call_id, value, codec, max_frame)
    if frame is not None:
        return [frame]
    if codec != JSON:
        return encode_frame({"type": "result", "id": call_id, "ok": value}, codec, max_frame)
    atts = []
    _encoding.atts = atts
    try:
        text = _encode_json(value)
    finally:
        _encoding.atts = None
    if atts:
        head = '{"type":"result","id":%d,"ok":%s,"att":[%s]}' % (
            call_id, text, ",".join([str(_nbytes(a)) for a in atts]))
    else:
        head = '{"type":"result","id":%d,"ok":%s}' % (call_id, text)
    head = head.encode("utf-8")
    size = 5 + len(head)
    for att in atts:
        size += _nbytes(att)
    if size > max_frame:
        raise FrameTooLarge("result message of %d bytes exceeds max_frame %d" % (size, max_frame))
    return [_FRAME_PREFIX.pack(size, 0x4A, len(head)) + head] + atts


def _nbytes(buf):
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


# --------------------------------------------------------------------------------------------
# Decoding


def _is_u64(value):
    return type(value) is int and value >= 0


class _Dangling(Exception):
    pass


def _resolve_placeholders(value, atts):
    """Replace placeholder maps by their attachment bytes, in place where possible."""
    if type(value) is dict:
        if len(value) == 1 and ATT_KEY in value:
            index = value[ATT_KEY]
            if not _is_u64(index) or index >= len(atts):
                raise _Dangling("attachment placeholder %r out of range (%d attachments)"
                                % (index, len(atts)))
            return atts[index]
        for key, item in value.items():
            if type(item) is dict or type(item) is list:
                value[key] = _resolve_placeholders(item, atts)
        return value
    if type(value) is list:
        for i, item in enumerate(value):
            if type(item) is dict or type(item) is list:
                value[i] = _resolve_placeholders(item, atts)
        return value
    return value


_scan_json = json.decoder.JSONDecoder().scan_once


_unpack_body_prefix = _BODY_PREFIX.unpack_from


def _loads_json_header(header):
    """A JSON header, or None if the general path should look (whitespace around it)."""
    text = header.decode("utf-8")
    value, end = _scan_json(text, 0)  # the scanner alone: json.loads adds two searches
    return value if end == len(text) else None


def _decode_plain(body):
    """The header of the usual message, a body that is all header (no attachments) in a codec
    this side reads, with the fields every message has; None for anything else, which
    ``decode_body``'s general path then decodes (or refuses with the reason)."""
    if len(body) < 5:
        return None
    codec_byte, header_len = _unpack_body_prefix(body)
    loads = _PLAIN_LOADS.get(codec_byte)
    if loads is None or 5 + header_len != len(body):
        return None
    try:
        header = loads(body[5:])
    except Exception:
        return None
    if (type(header) is dict and type(header.get("type")) is str and "att" not in header
            and _ATT_KEY_BYTES not in body):
        return header
    return None


# Codec byte -> how to decode a header, for decode_body's usual case (C functions where the
# codec has one: no Python frame per message).
_PLAIN_LOADS = {0x4A: _loads_json_header, 0x53: marshal.loads}
if _msgpack is not None:
    _PLAIN_LOADS[0x4D] = functools.partial(_msgpack.unpackb, raw=False, strict_map_key=False)


def decode_body(body):
    """Decode one frame body into its header dict, attachments already substituted as bytes."""
    size = len(body)
    if size < 5:
        raise ProtocolError("frame body of %d bytes is shorter than its 5-byte prefix" % size)
    header = _decode_plain(body)
    if header is not None:
        return header
    codec_byte, header_len = _unpack_body_prefix(body)
    header_end = 5 + header_len
    codec = _BYTE_CODEC.get(codec_byte)
    try:
        if codec == JSON:
            text = str(body[5:header_end], "utf-8")
            mentions_placeholder = ATT_KEY in text
            try:
                # The scanner alone: json.loads adds two whitespace searches per message.
                header, end = _scan_json(text, 0)
            except StopIteration:
                header, end = None, -1
            if end != len(text):
                header = json.loads(text)  # whitespace around it, or not JSON: its error
        elif codec == MSGPACK:
            if _msgpack is None:
                raise ProtocolError("received a msgpack frame but msgpack is not installed")
            packed = bytes(body[5:header_end])
            mentions_placeholder = _ATT_KEY_BYTES in packed
            header = _msgpack.unpackb(packed, raw=False, strict_map_key=False)
        elif codec == MARSHAL:
            packed = bytes(body[5:header_end])
            mentions_placeholder = _ATT_KEY_BYTES in packed
            header = marshal.loads(packed)
        else:
            raise ProtocolError("unknown codec byte 0x%02x" % codec_byte)
    except ProtocolError:
        raise
    except Exception as exc:  # any decoder failure means the same thing: a bad header
        raise ProtocolError("cannot decode %s header: %s" % (codec, exc)) from None
    if type(header) is not dict:
        raise ProtocolError("header is a %s, not a map" % type(header).__name__)
    if not isinstance(header.get("type"), str):
        raise ProtocolError("header has no string 'type' field")

    lengths = header.get("att")
    if lengths is None:
        lengths = ()
    elif not isinstance(lengths, list) or not all(_is_u64(n) for n in lengths):
        raise ProtocolError("'att' must be a list of non-negative integers")
    expected = header_end + sum(lengths)
    if expected != size:
        raise ProtocolError("body is %d bytes but its header announces %d" % (size, expected))

    # Skip the walk for the common attachment-free message; still walk if a placeholder appears,
    # so that a dangling placeholder is rejected instead of reaching a handler as a dict.
    if lengths or mentions_placeholder:
        mv = memoryview(body)
        atts = []
        offset = header_end
        for n in lengths:
            atts.append(bytes(mv[offset:offset + n]))
            offset += n
        try:
            header = _resolve_placeholders(header, atts)
        except _Dangling as exc:
            if header["type"] == "call" and _is_u64(header.get("id")):
                raise BadCall(header, str(exc)) from None
            raise ProtocolError(str(exc)) from None
    return header


# --------------------------------------------------------------------------------------------
# Framing over a byte stream


def _read_exact(readinto, view):
    """Fill ``view``; return the number of bytes read (less than len(view) only at EOF)."""
    total = 0
    size = len(view)
    while total < size:
        n = readinto(view[total:])
        if not n:
            break
        total += n
    return total


def read_frame(readinto, max_frame=DEFAULT_MAX_FRAME):
    """Read one frame body with ``readinto(memoryview) -> int``; None on a clean EOF.

    The length is checked against ``max_frame`` before the body buffer is allocated, so a
    corrupt or hostile length cannot make the reader allocate gigabytes.
    """
    prefix = bytearray(4)
    got = _read_exact(readinto, memoryview(prefix))
    if got == 0:
        return None
    if got < 4:
        raise ProtocolError("channel closed inside a frame length")
    (length,) = _LEN.unpack(prefix)
    if length == 0:
        raise ProtocolError("zero-length frame")
    if length > max_frame:
        raise ProtocolError("frame of %d bytes exceeds max_frame %d" % (length, max_frame))
    body = bytearray(length)
    if _read_exact(readinto, memoryview(body)) < length:
        raise ProtocolError("channel closed inside a %d-byte frame" % length)
    return body


class FrameReader:
    """Reads frames from a byte stream with one ``readinto`` call per frame, not two.

    ``read_frame`` asks for exactly the 4 length bytes and then exactly the body, so each frame
    costs two system calls. This reader fills a buffer with whatever the stream has (often
    several small frames at once) and cuts frames out of it. Frames larger than the buffer are
    still read straight into a buffer of their own size, allocated only after the length was
    checked against ``max_frame``. All reads of a stream must then go through one FrameReader,
    since it may hold bytes that belong to the next frames.
    """

    def __init__(self, readinto, max_frame=DEFAULT_MAX_FRAME, buffer_size=64 * 1024):
        self._readinto = readinto
        self.max_frame = max_frame
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # buffered bytes are _buf[_start:_end]
        self._end = 0
        # Whether the last read got less than it asked for: the stream had nothing more to give
        # at that moment, so a caller that asks right away need not ask the kernel again.
        self.drained = False

    def _fill(self, need):
        """Read until ``need`` bytes are buffered; False on EOF first."""
        if self._start + need > len(self._buf):  # no room behind: move what we have to the front
            held = self._end - self._start
            self._buf[:held] = self._view[self._start:self._end]
            self._start, self._end = 0, held
        while self._end - self._start < need:
            space = len(self._buf) - self._end
            n = self._readinto(self._view[self._end:])
            if not n:
                return False
            self._end += n
            self.drained = n < space
        return True

    def buffered(self):
        """Whether a whole frame is already buffered (the next read needs no system call)."""
        held = self._end - self._start
        if held < 4:
            return False
        (length,) = _LEN.unpack_from(self._buf, self._start)
        return held - 4 >= length

    def read(self):
        """The next frame body, or None on a clean EOF; ProtocolError for a bad frame."""
        start = self._start
        end = self._end
        if start == end:
            # Nothing buffered, as between the calls of a call-and-reply exchange: read into the
            # whole buffer, from its start.
            n = self._readinto(self._view)
            self._start = start = 0
            self._end = end = n or 0
            if not n:
                return None
            self.drained = n < len(self._buf)
        if end - start >= 4:
            (length,) = _unpack_len(self._buf, start)
            stop = start + 4 + length
            if stop <= end and 0 < length <= self.max_frame:  # a whole frame is buffered
                self._start = stop
                return self._buf[start + 4:stop]
        return self._read_rest()

    def read_alone(self):
        """The header of the next frame when it is the usual one of a call-and-reply exchange:
        nothing was buffered, one read brought exactly that frame and emptied the stream, and it
        is a plain message (``_decode_plain``). Otherwise None, having consumed nothing: ``read``
        then returns that frame from the buffer, or learns of the end of the stream."""
        if self._start != self._end:
            return None
        n = self._readinto(self._view)
        if not n:
            return None  # the end of the stream, which read() will see again
        self._start = 0
        self._end = n
        self.drained = n < len(self._buf)
        if n < 4 or not self.drained:
            return None
        (length,) = _unpack_len(self._buf, 0)
        if length + 4 != n or length > self.max_frame:
            return None
        header = _decode_plain(self._buf[4:n])
        if header is not None:
            self._start = n
        return header

    def _read_rest(self):
        """``read`` of a frame that is not all buffered yet, or is bad."""
        if self._end - self._start < 4 and not self._fill(4):
            if self._end == self._start:
                return None
            raise ProtocolError("channel closed inside a frame length")
        (length,) = _LEN.unpack_from(self._buf, self._start)
        if length == 0:
            raise ProtocolError("zero-length frame")
        if length > self.max_frame:
            raise ProtocolError("frame of %d bytes exceeds max_frame %d" % (length, self.max_frame))
        start = self._start + 4
        if length > len(self._buf) - 4:
            # Too large for the buffer: take what it holds, read the rest in place.
            body = bytearray(length)
            held = self._end - start
            body[:held] = self._view[start:self._end]
            self._start = self._end = 0
            self.drained = False  # read exactly to the frame's end: more may follow
            if _read_exact(self._readinto, memoryview(body)[held:]) < length - held:
                raise ProtocolError("channel closed inside a %d-byte frame" % length)
            return body
        if self._end - start < length:
            if not self._fill(4 + length):
                raise ProtocolError("channel closed inside a %d-byte frame" % length)
            start = self._start + 4
        self._start = start + length
        return self._buf[start:self._start]


def write_all(writev, parts):
    """Write every buffer in ``parts`` with ``writev(list_of_buffers) -> int``.

    Handles partial writes and IOV_MAX without joining the buffers into one copy.
    """
    if len(parts) == 1 and type(parts[0]) is bytes:  # a message without attachments
        size = len(parts[0])
        skip = writev(parts)
        if skip == size:
            return
        if skip <= 0:
            raise BrokenPipeError("the channel accepted no bytes")
        return write_all(writev, [memoryview(parts[0])[skip:]])
    skip = 0
    if len(parts) <= _IOV_MAX:
        # The usual case: one call writes everything, and nothing needs a memoryview.
        total = 0
        for p in parts:
            total += _nbytes(p)
        skip = writev(parts)
        if skip == total:
            return
        if skip <= 0:
            raise BrokenPipeError("the channel accepted no bytes")
    views = [memoryview(p).cast("B") if not isinstance(p, memoryview) else p for p in parts]
    i = 0
    while skip > 0:  # drop what the first call wrote
        n = len(views[i])
        if skip >= n:
            skip -= n
            i += 1
        else:
            views[i] = views[i][skip:]
            skip = 0
    while i < len(views) and len(views[i]) == 0:
        i += 1
    while i < len(views):
        written = writev(views[i:i + _IOV_MAX])
        if written <= 0 and len(views[i]):
            raise BrokenPipeError("the channel accepted no bytes")
        while written > 0:
            n = len(views[i])
            if written >= n:
                written -= n
                i += 1
            else:
                views[i] = views[i][written:]
                written = 0
        while i < len(views) and len(views[i]) == 0:  # empty attachments need no syscall
            i += 1
