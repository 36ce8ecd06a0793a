"""The ZeroMQ channel of the worker runtime: a pyzmq DEALER connected to the pool's ROUTER.

PROTOCOL.md section 9 is the normative description; in short:

* One ZeroMQ message carries one protocol body, split over one or more frames whose
  concatenation is the body (so attachments go out without being copied into one buffer).
* Before anything else the worker sends ``join`` (with a fresh worker nonce), the pool answers
  ``challenge`` (its nonce) and the worker ``auth`` (HMAC-SHA256 of the pool nonce under the
  secret). These three are plain JSON bodies.
* On ``tcp://`` endpoints every later message starts with one 40-byte frame: the HMAC-SHA256 of
  ``direction || seq || body`` under the connection's session key (derived from the secret and
  both nonces), then ``seq`` as 8 bytes big-endian. ``seq`` counts 0, 1, 2, ... per direction,
  so a replayed, dropped, reordered or altered message fails. ``ipc://`` endpoints (a private
  directory on the pool's machine) carry bodies without that frame.

ZeroMQ sockets must not be used from two threads at once, yet the runtime reads on one thread
while others write. So every socket operation happens under one lock, and the reader waits for
input *outside* the lock by polling the socket's ZMQ_FD (and a wake-up pipe): ZMQ_FD is edge
triggered and any socket call may consume its edge, so a writer that sees input pending after its
send (ZMQ_EVENTS) wakes the reader through the pipe.

pyzmq is imported here only, so the stdio and ipc transports stay stdlib-only.
"""

import hashlib
import hmac
import os
import select
import socket
import struct
import threading

from . import protocol
from .protocol import FrameTooLarge, ProtocolError

ENV_CONNECT = "PYPOOL_ZMQ_CONNECT"
ENV_IDENTITY = "PYPOOL_ZMQ_IDENTITY"
TRANSPORT_VERSION = 1
MAC_LEN = 32
ENVELOPE_LEN = MAC_LEN + 8
TO_WORKER = b"\x00"
TO_POOL = b"\x01"
SESSION_LABEL = b"pypool-zmq-session-v1"
# How long an exiting worker lets queued messages (a STARTUP_ERROR, a GOODBYE, a last RESULT) go
# out before the process ends.
FLUSH_SECONDS = 1.0
_SEQ = struct.Struct(">Q")
_MIN_SECRET_BYTES = 16


class TransportError(Exception):
    """The channel cannot be opened: a bad endpoint or secret, or the pool refused us."""


TransportError.__module__ = "pypool_worker"


def load_secret_file(path):
    """The key in a secret file: hex text (at least 16 bytes once decoded; 32 recommended)."""
    try:
        with open(path, "rb") as f:
            text = f.read(64 * 1024).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TransportError("cannot read the secret file %s: %s" % (path, exc)) from None
    return parse_secret(text, "the secret file %s" % path)


def parse_secret(text, where="the pool's secret"):
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise TransportError("%s is not hex text" % where) from None
    if len(key) < _MIN_SECRET_BYTES:
        raise TransportError("%s is %d bytes; at least %d are needed (generate one with "
                             "`openssl rand -hex 32`)" % (where, len(key), _MIN_SECRET_BYTES))
    return key


def auth_mac(key, nonce):
    """The AUTH answer: lowercase hex HMAC-SHA256 of the pool's nonce (as for ipc)."""
    return hmac.new(key, nonce.encode("utf-8"), hashlib.sha256).hexdigest()


def session_key(key, pool_nonce, worker_nonce):
    """The per-connection signing key: HMAC(secret, label 0 pool_nonce 0 worker_nonce)."""
    material = b"\x00".join((SESSION_LABEL, pool_nonce.encode("ascii"),
                             worker_nonce.encode("ascii")))
    return hmac.new(key, material, hashlib.sha256).digest()


class Signer:
    """Signs outgoing messages of one direction and checks incoming ones of the other."""

    def __init__(self, key, send_direction, recv_direction):
        self._base = hmac.new(key, digestmod=hashlib.sha256)
        self._send_dir = send_direction
        self._recv_dir = recv_direction
        self.send_seq = 0
        self.recv_seq = 0

    def _mac(self, direction, seq_bytes, parts):
        h = self._base.copy()
        h.update(direction)
        h.update(seq_bytes)
        for part in parts:
            h.update(part)
        return h.digest()

    def envelope(self, parts):
        """The first frame for the next outgoing message made of ``parts``."""
        seq_bytes = _SEQ.pack(self.send_seq)
        self.send_seq += 1
        return self._mac(self._send_dir, seq_bytes, parts) + seq_bytes

    def check(self, frames):
        """The body frames of an incoming signed message; ProtocolError if it is not genuine."""
        if len(frames) < 2:
            raise ProtocolError("a signed message needs an envelope and a body")
        envelope = frames[0]
        if len(envelope) != ENVELOPE_LEN:
            raise ProtocolError("envelope of %d bytes, expected %d"
                                % (len(envelope), ENVELOPE_LEN))
        envelope = bytes(envelope)
        seq_bytes = envelope[MAC_LEN:]
        body = frames[1:]
        expected = self._mac(self._recv_dir, seq_bytes, body)
        if not hmac.compare_digest(expected, envelope[:MAC_LEN]):
            raise ProtocolError("message %d has a wrong signature (forged or altered)"
                                % self.recv_seq)
        (seq,) = _SEQ.unpack(seq_bytes)
        if seq != self.recv_seq:
            raise ProtocolError("message sequence %d where %d was due (replayed or lost)"
                                % (seq, self.recv_seq))
        self.recv_seq += 1
        return body


def _join_body(parts):
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _json_body(header):
    return protocol.encode_body(header, protocol.JSON)


def default_identity():
    """A routing identity for a remote worker: host, pid and 64 random bits (for the logs)."""
    host = socket.gethostname()[:64] or "host"
    return ("%s/%d/%s" % (host, os.getpid(), os.urandom(8).hex())).encode("utf-8")


class ZmqChannel:
    """The runtime's channel (``recv``/``send``/``encode``/``write``) over a pyzmq DEALER."""

    def __init__(self, endpoint, identity, key, zmq_module=None):
        import zmq  # only this transport needs pyzmq

        self._zmq = zmq if zmq_module is None else zmq_module
        if not (endpoint.startswith("tcp://") or endpoint.startswith("ipc://")):
            raise TransportError("the zmq endpoint must be tcp://HOST:PORT or ipc://PATH, got %r"
                                 % endpoint)
        self.endpoint = endpoint
        self.identity = identity
        self.signed = endpoint.startswith("tcp://")
        self._key = key
        self._signer = None
        self.codec = protocol.JSON
        self._max_frame = protocol.DEFAULT_MAX_FRAME
        self._lock = threading.RLock()
        self._closed = False
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        # A frame larger than this makes libzmq drop the connection before allocating it.
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.DEFAULT_MAX_FRAME + 64)
        # Connection attempts back off from 100 ms to 5 s while the pool is not there yet.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if self.signed:
            # A pool host that vanishes without closing the connection: the kernel notices
            # (keepalive while idle, a retransmission limit while sending) and the connection
            # ends, which ends this worker.
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
            sock.setsockopt(zmq.TCP_MAXRT, 60000)
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._monitor_fd = self._monitor.getsockopt(zmq.FD)
        self._monitor_due = True  # look at the monitor before the first wait
        self._poller = select.poll()
        self._poller.register(sock.getsockopt(zmq.FD), select.POLLIN)
        self._poller.register(self._monitor_fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        sock.connect(endpoint)

    # ---- the runtime's channel interface -----------------------------------------------

    @property
    def max_frame(self):
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value):
        self._max_frame = value

    def encode(self, header):
        parts = protocol.encode_body(header, self.codec)
        size = 0
        for part in parts:
            size += part.nbytes if isinstance(part, memoryview) else len(part)
        if size > self._max_frame:
            raise FrameTooLarge("%s message of %d bytes exceeds max_frame %d"
                                % (header.get("type", "?"), size, self._max_frame))
        return parts

    def send(self, header):
        self.write(self.encode(header))

    # What to do when a write finds the connection gone: the runtime sets its exit here
    # (nobody is left to answer, the EOF case); by default the error propagates.
    on_closed = None

    def write(self, parts):
        try:
            self._write(parts)
        except self._zmq.ZMQError as exc:
            if self.on_closed is None:
                raise
            self.on_closed("channel closed while writing (%s), exiting" % exc)

    def recv(self):
        """The next message from the pool, or None once the connection is gone."""
        frames = self._recv_frames()
        if frames is None:
            return None
        if self._signer is not None:
            if (len(frames) == 1 and self._signer.recv_seq == 0
                    and bytes(memoryview(frames[0])[:1]) == b"J"):
                # Refused at AUTH: the pool's reject comes before any signed message (it has
                # no session key for a peer that failed), and only then is one accepted. It is
                # JSON (the handshake's codec): nothing unsigned reaches another decoder.
                msg = protocol.decode_body(frames[0])
                if msg["type"] == "reject":
                    raise ProtocolError("the pool refused this worker: %s" % (msg.get("reason"),))
            frames = self._signer.check(frames)
        body = _join_body(frames)
        if len(body) > self._max_frame:
            raise ProtocolError("message of %d bytes exceeds max_frame %d"
                                % (len(body), self._max_frame))
        return protocol.decode_body(body)

    # ---- socket access (under the lock) ------------------------------------------------

    def _write(self, parts):
        zmq = self._zmq
        with self._lock:
            if self._closed:
                raise zmq.ZMQError(zmq.ENOTSOCK, "the channel is closed")
            if self._signer is not None:
                parts = [self._signer.envelope(parts)] + list(parts)
            self._sock.send_multipart(parts, copy=False)
            # Sending may have consumed the ZMQ_FD edge of a message that arrived meanwhile:
            # tell the reader to look again.
            if self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass  # a wake-up is pending already

    def _recv_frames(self):
        """The frames of the next message, or None once the connection dropped."""
        zmq = self._zmq
        events, pollin, noblock = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK
        sock, lock, wake_r, monitor_fd = self._sock, self._lock, self._wake_r, self._monitor_fd
        while True:
            with lock:
                if self._closed:
                    return None
                # ZMQ_EVENTS rather than a NOBLOCK recv that may raise: no exception per wait.
                if sock.getsockopt(events) & pollin:
                    return sock.recv_multipart(noblock)
                if self._monitor_due:
                    self._monitor_due = False
                    if self._disconnected():
                        return None
            for fd, _ in self._poller.poll():
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd == monitor_fd:
                    self._monitor_due = True

    def _disconnected(self):
        """Whether the monitor reported the connection to the pool lost (under the lock)."""
        zmq = self._zmq
        while self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = self._monitor.recv_multipart(zmq.NOBLOCK)
            (kind,) = struct.unpack_from("=H", event[0])
            if kind == zmq.EVENT_DISCONNECTED:
                return True
        return False

    def _send_raw(self, header):
        with self._lock:
            self._sock.send_multipart(_json_body(header), copy=False)
            if self._sock.getsockopt(self._zmq.EVENTS) & self._zmq.POLLIN:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass

    def _recv_raw(self):
        frames = self._recv_frames()
        if frames is None:
            return None
        return protocol.decode_body(_join_body(frames))

    # ---- joining -------------------------------------------------------------------------

    def join(self):
        """JOIN, CHALLENGE, AUTH. Returns False if the pool closed the connection first."""
        worker_nonce = os.urandom(32).hex()
        self._send_raw({"type": "join", "transport": TRANSPORT_VERSION, "nonce": worker_nonce})
        msg = self._recv_raw()
        if msg is None:
            return False
        if msg["type"] == "reject":
            raise TransportError("the pool refused this worker: %s" % (msg.get("reason"),))
        nonce = msg.get("nonce")
        if msg["type"] != "challenge" or not isinstance(nonce, str) or not nonce:
            raise ProtocolError("expected a challenge with a nonce, got %r" % msg["type"])
        self._send_raw({"type": "auth", "mac": auth_mac(self._key, nonce)})
        if self.signed:
            self._signer = Signer(session_key(self._key, nonce, worker_nonce), TO_POOL, TO_WORKER)
        return True

    # ---- exiting -------------------------------------------------------------------------

    def flush_and_close(self, timeout=FLUSH_SECONDS):
        """Let queued messages go out (up to ``timeout``), then close the sockets.

        Called on the way out of the process, from any thread: the lock is taken with a bound
        (its owner may be the caller, hence an RLock), and the context's termination, which
        waits for the linger period, runs on a helper thread joined with a bound.
        """
        acquired = self._lock.acquire(timeout=timeout)
        try:
            if self._closed:
                return
            self._closed = True
            try:
                self._sock.disable_monitor()
            except Exception:
                pass
            for sock, linger in ((self._monitor, 0), (self._sock, int(timeout * 1000))):
                try:
                    sock.close(linger=linger)
                except Exception:
                    pass
            term = threading.Thread(target=self._ctx.term, name="pypool-zmq-flush", daemon=True)
            term.start()
            term.join(timeout + 0.5)
        finally:
            if acquired:
                self._lock.release()


def open_channel(secret, connect=None, secret_file=None, log=None, on_closed=None):
    """Connect, join and authenticate; the channel the runtime serves on.

    Local workers (started by the pool) get the endpoint in PYPOOL_ZMQ_CONNECT, their identity in
    PYPOOL_ZMQ_IDENTITY and the secret on the inherited pipe. Remote workers give
    ``--connect`` and ``--secret-file`` and get a fresh identity.
    """
    endpoint = connect or os.environ.get(ENV_CONNECT)
    if not endpoint:
        raise TransportError("--transport zmq needs --connect tcp://HOST:PORT (or "
                             "PYPOOL_ZMQ_CONNECT from a pool that started this worker)")
    if secret_file is not None:
        key = load_secret_file(secret_file)
    elif secret is not None:
        key = parse_secret(secret)
    else:
        raise TransportError("--transport zmq needs --secret-file FILE (or the secret on the "
                             "descriptor named by PYPOOL_SECRET_FD)")
    identity = os.environ.pop(ENV_IDENTITY, None)
    identity = identity.encode("utf-8") if identity else default_identity()
    channel = ZmqChannel(endpoint, identity, key)
    channel.on_closed = on_closed
    if log is not None:
        log("joining the pool at %s as %s" % (endpoint, identity.decode("utf-8", "replace")))
    try:
        joined = channel.join()
    except BaseException:
        channel.flush_and_close(0)
        raise
    if not joined:
        channel.flush_and_close(0)
        raise TransportError("the pool at %s closed the connection before its challenge"
                             % endpoint)
    return channel


__all__ = ["ZmqChannel", "TransportError", "open_channel", "load_secret_file", "auth_mac",
           "session_key", "Signer"]
