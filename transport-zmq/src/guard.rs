//! The guard in front of a `tcp://` ROUTER: a relay that reads every byte a network peer sends
//! before the `zeromq` crate does, and closes the connection when the bytes could hurt the pool.
//!
//! Why: the crate's ZMTP decoder reserves memory for whatever length a frame header announces,
//! before a byte of the frame has arrived, and has no maximum message size. A 10-byte header
//! announcing a terabyte aborts the pool's process ("memory allocation failed"); a few hundred
//! connections announcing a gigabyte each exhaust its memory; and the crate waits for every
//! connection's ZMTP handshake without a deadline. (Pinned by `tests/hostile.rs`.)
//!
//! So the ROUTER itself listens only on a Unix socket in a private directory, and the public
//! TCP port belongs to this guard. For each connection it checks, as the bytes stream through:
//!
//! * the ZMTP greeting (version 3, NULL mechanism) and the READY command within the auth
//!   timeout; commands are at most [`MAX_COMMAND`] bytes;
//! * until the pool has authenticated the connection's identity (JOIN/CHALLENGE/AUTH), messages
//!   of at most [`MAX_UNAUTHENTICATED`] bytes and [`MAX_UNAUTHENTICATED_FRAMES`] frames. A larger
//!   one waits, unforwarded, for the pool's verdict on the AUTH sent before it (so a worker's
//!   HELLO right after its AUTH is never refused by a race), and ends the connection if the
//!   identity is not authenticated by the auth deadline;
//! * once authenticated, messages of at most the configured maximum (the pool's `max_frame`,
//!   plus the signature envelope).
//!
//! Nothing is buffered beyond one read (64 KiB) per connection, and at most
//! [`MAX_CONNECTIONS`] connections are relayed at once. What the pool sends back is copied
//! unchanged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeromq::util::PeerIdentity;

use crate::hub::Verdicts;

/// Connections relayed at once; more are closed on accept.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// The largest ZMTP command (READY with its properties is well under a kilobyte).
pub(crate) const MAX_COMMAND: u64 = 4096;
/// The largest message before the connection is authenticated (JOIN and AUTH are ~200 bytes).
pub(crate) const MAX_UNAUTHENTICATED: u64 = 4096;
/// The most frames in one message before the connection is authenticated.
pub(crate) const MAX_UNAUTHENTICATED_FRAMES: u32 = 4;
/// The most frames in one message of an authenticated worker (a body and its attachments).
const MAX_FRAMES: u32 = 1 << 20;
/// What each frame is counted as on top of its bytes, for the message size limit (the crate
/// keeps a buffer handle per frame).
const FRAME_OVERHEAD: u64 = 64;
/// Pause after a failed accept (a full descriptor table), so a persistent error does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const READ_BUFFER: usize = 64 * 1024;

/// Settings of a guard.
#[derive(Clone)]
pub(crate) struct GuardConfig {
    /// The largest message of an authenticated worker, in bytes (frames and overhead counted).
    pub(crate) max_message: u64,
    /// Time from accept to a complete ZMTP handshake, and to authentication for a connection
    /// that sends a large message.
    pub(crate) auth_timeout: Duration,
    /// For log messages.
    pub(crate) label: String,
}

/// A running guard: the public listener's accept loop and its relays.
pub(crate) struct Guard {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Guard {
    /// Relays connections accepted on `listener` to the ROUTER's Unix socket at `inner`.
    pub(crate) fn start(
        listener: TcpListener,
        inner: PathBuf,
        config: GuardConfig,
        verdicts: Verdicts,
    ) -> Guard {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared {
            inner,
            config,
            verdicts,
            active: AtomicUsize::new(0),
            stop: stop.clone(),
            tasks: tasks.clone(),
            log: parking_lot::Mutex::new(crate::hub::LogLimiter::default()),
        });
        tasks.spawn(accept_loop(listener, shared));
        Guard { stop, tasks }
    }

    /// Stops accepting and ends every relay; waits until they are gone.
    pub(crate) async fn shut_down(&self) {
        self.close();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Stops accepting and ends every relay (synchronous; the tasks end on their own).
    pub(crate) fn close(&self) {
        self.stop.cancel();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.close();
    }
}

struct Shared {
    inner: PathBuf,
    config: GuardConfig,
    verdicts: Verdicts,
    active: AtomicUsize,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Keeps a flood of bad connections from flooding the logs.
    log: parking_lot::Mutex<crate::hub::LogLimiter>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if shared.active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    shared.log.lock().warn_text(
                        &shared.config.label,
                        &format!(
                            "refused a connection from {peer}: {MAX_CONNECTIONS} already open"
                        ),
                    );
                    drop(stream);
                    continue;
                }
                shared.active.fetch_add(1, Ordering::Relaxed);
                let relay_shared = Arc::clone(&shared);
                shared.tasks.spawn(async move {
                    let shared = relay_shared;
                    let outcome = tokio::select! {
                        _ = shared.stop.cancelled() => Ok(()),
                        outcome = relay(stream, &shared) => outcome,
                    };
                    if let Err(reason) = outcome {
                        shared.log.lock().warn_text(
                            &shared.config.label,
                            &format!("closed the connection from {peer}: {reason}"),
                        );
                    }
                    shared.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(err) => {
                tracing::warn!(target: "pypool::zmq", endpoint = %shared.config.label, error = %err, "accepting a connection failed");
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

/// Relays one connection until either side ends; `Err` says why the guard ended it.
async fn relay(public: TcpStream, shared: &Shared) -> Result<(), String> {
    let _ = public.set_nodelay(true);
    let inner = UnixStream::connect(&shared.inner)
        .await
        .map_err(|err| format!("cannot reach the ROUTER: {err}"))?;
    let (mut public_read, mut public_write) = public.into_split();
    let (mut inner_read, mut inner_write) = inner.into_split();
    let outbound = async {
        // The pool's side is trusted: copied as it comes.
        let _ = tokio::io::copy(&mut inner_read, &mut public_write).await;
        Ok(())
    };
    let inbound = async {
        let deadline = Instant::now() + shared.config.auth_timeout;
        let mut inspector = Inspector::new(shared.config.max_message);
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            let n = if inspector.handshake_done() {
                public_read.read(&mut buf).await
            } else {
                tokio::time::timeout_at(deadline, public_read.read(&mut buf))
                    .await
                    .map_err(|_| "no ZMTP handshake within the auth timeout".to_owned())?
            };
            let n = match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                match inspector.feed(chunk)? {
                    Step::Forward(used) => {
                        inner_write
                            .write_all(&chunk[..used])
                            .await
                            .map_err(|err| format!("the ROUTER's side failed: {err}"))?;
                        chunk = &chunk[used..];
                    }
                    Step::NeedsAuthentication(identity) => {
                        if !shared.verdicts.wait_authenticated(identity, deadline).await {
                            return Err("a large message before authenticating".to_owned());
                        }
                        inspector.authenticated();
                    }
                }
            }
        }
    };
    tokio::select! {
        outcome = outbound => outcome,
        outcome = inbound => outcome,
    }
}

/// What [`Inspector::feed`] allows.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Forward this many bytes of the chunk.
    Forward(usize),
    /// A frame needs the larger limit: wait for the pool to authenticate this identity.
    NeedsAuthentication(Option<PeerIdentity>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    FrameFlags,
    FrameLength { long: bool },
    FrameBody,
}

/// A streaming ZMTP 3 parser that checks frame sizes as the bytes arrive.
struct Inspector {
    state: State,
    /// Bytes of the current field collected so far (greeting, length, command body).
    field: Vec<u8>,
    /// Flags of the current frame.
    command: bool,
    more: bool,
    /// Bytes of the current frame still to come.
    remaining: u64,
    /// Size (with overhead) and frame count of the current message so far.
    message: u64,
    frames: u32,
    /// Complete messages so far (a worker's JOIN and AUTH come before anything large).
    messages: u32,
    ready: bool,
    identity: Option<PeerIdentity>,
    authenticated: bool,
    max_message: u64,
    /// The frame whose length was read but not yet allowed (waiting for authentication).
    held: Option<u64>,
}

impl Inspector {
    fn new(max_message: u64) -> Self {
        Inspector {
            state: State::Greeting,
            field: Vec::with_capacity(64),
            command: false,
            more: false,
            remaining: 0,
            message: 0,
            frames: 0,
            messages: 0,
            ready: false,
            identity: None,
            authenticated: false,
            max_message,
            held: None,
        }
    }

    fn handshake_done(&self) -> bool {
        self.ready
    }

    fn authenticated(&mut self) {
        self.authenticated = true;
    }

    /// Checks the start of `chunk`; returns how much of it may be forwarded, or why not.
    fn feed(&mut self, chunk: &[u8]) -> Result<Step, String> {
        let mut used = 0;
        while used < chunk.len() {
            match self.state {
                State::Greeting => {
                    let take = (64 - self.field.len()).min(chunk.len() - used);
                    self.field.extend_from_slice(&chunk[used..used + take]);
                    used += take;
                    if self.field.len() == 64 {
                        check_greeting(&self.field)?;
                        self.field.clear();
                        self.state = State::FrameFlags;
                    }
                }
                State::FrameFlags => {
                    let flags = chunk[used];
                    if flags & !0b111 != 0 {
                        return Err(format!("bad ZMTP frame flags {flags:#04x}"));
                    }
                    used += 1;
                    self.command = flags & 0b100 != 0;
                    self.more = flags & 0b001 != 0;
                    if self.command && self.more {
                        return Err("a ZMTP command with the MORE flag".to_owned());
                    }
                    if !self.command && !self.ready {
                        return Err("a message before the READY command".to_owned());
                    }
                    self.state = State::FrameLength {
                        long: flags & 0b010 != 0,
                    };
                }
                State::FrameLength { long } => {
                    let need = if long { 8 } else { 1 };
                    let take = (need - self.field.len()).min(chunk.len() - used);
                    self.field.extend_from_slice(&chunk[used..used + take]);
                    if self.field.len() < need {
                        used += take;
                        continue;
                    }
                    let length = if long {
                        let mut bytes = [0u8; 8];
                        bytes.copy_from_slice(&self.field);
                        u64::from_be_bytes(bytes)
                    } else {
                        // `field` holds exactly `need` (1) bytes here.
                        u64::from(self.field[0])
                    };
                    if let Some(step) = self.admit(length)? {
                        // Nothing of this length field is forwarded until the verdict.
                        self.field.truncate(self.field.len() - take);
                        self.held = Some(length);
                        return Ok(if used == 0 { step } else { Step::Forward(used) });
                    }
                    used += take;
                    self.field.clear();
                    self.remaining = length;
                    self.state = State::FrameBody;
                    if length == 0 {
                        self.end_frame()?;
                    }
                }
                State::FrameBody => {
                    let take = (self.remaining.min((chunk.len() - used) as u64)) as usize;
                    if self.command {
                        self.field.extend_from_slice(&chunk[used..used + take]);
                    }
                    used += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.end_frame()?;
                    }
                }
            }
        }
        Ok(Step::Forward(used))
    }

    /// Whether a frame of `length` may come; `Some` to wait for authentication first.
    fn admit(&mut self, length: u64) -> Result<Option<Step>, String> {
        if self.held == Some(length) && self.authenticated {
            self.held = None;
        }
        if self.command {
            if length > MAX_COMMAND {
                return Err(format!("a ZMTP command of {length} bytes"));
            }
            return Ok(None);
        }
        let size = self
            .message
            .saturating_add(length)
            .saturating_add(FRAME_OVERHEAD);
        let frames = self.frames + 1;
        if !self.authenticated
            && (size > MAX_UNAUTHENTICATED || frames > MAX_UNAUTHENTICATED_FRAMES)
        {
            if self.messages < 2 {
                // Not even JOIN and AUTH yet: no verdict is coming.
                return Err("a large message before joining".to_owned());
            }
            return Ok(Some(Step::NeedsAuthentication(self.identity.clone())));
        }
        if size > self.max_message || frames > MAX_FRAMES {
            return Err(format!(
                "a message of more than {} bytes or {MAX_FRAMES} frames",
                self.max_message
            ));
        }
        self.message = size;
        self.frames = frames;
        Ok(None)
    }

    fn end_frame(&mut self) -> Result<(), String> {
        self.state = State::FrameFlags;
        if self.command {
            let body = std::mem::take(&mut self.field);
            if let Some(identity) = parse_ready(&body)? {
                self.ready = true;
                self.identity = identity;
            }
            return Ok(());
        }
        if !self.more {
            self.message = 0;
            self.frames = 0;
            self.messages = self.messages.saturating_add(1);
        }
        Ok(())
    }
}

fn check_greeting(greeting: &[u8]) -> Result<(), String> {
    if greeting[0] != 0xFF || greeting[9] & 0x01 == 0 {
        return Err("not a ZMTP 3 greeting".to_owned());
    }
    if greeting[10] < 3 {
        return Err(format!("ZMTP version {}, not 3", greeting[10]));
    }
    let mechanism = &greeting[12..32];
    let name_end = mechanism.iter().position(|&b| b == 0).unwrap_or(20);
    if &mechanism[..name_end] != b"NULL" {
        return Err("a security mechanism other than NULL".to_owned());
    }
    Ok(())
}

/// For a READY command: `Some(identity)` (the identity property, if any). `None` for another
/// command (PING, ...).
fn parse_ready(command: &[u8]) -> Result<Option<Option<PeerIdentity>>, String> {
    let Some((&name_len, rest)) = command.split_first() else {
        return Err("an empty ZMTP command".to_owned());
    };
    let name_len = usize::from(name_len);
    if rest.len() < name_len {
        return Err("a truncated ZMTP command".to_owned());
    }
    let (name, mut properties) = rest.split_at(name_len);
    if name != b"READY" {
        return Ok(None);
    }
    let mut identity = None;
    while let Some((&len, rest)) = properties.split_first() {
        let len = usize::from(len);
        if rest.len() < len + 4 {
            return Err("a truncated READY property".to_owned());
        }
        let (key, rest) = rest.split_at(len);
        // At least 4 bytes remain: checked above.
        let value_len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let rest = &rest[4..];
        if rest.len() < value_len {
            return Err("a truncated READY property".to_owned());
        }
        let (value, rest) = rest.split_at(value_len);
        if key.eq_ignore_ascii_case(b"Identity") && !value.is_empty() {
            identity = PeerIdentity::try_from(value).ok();
        }
        properties = rest;
    }
    Ok(Some(identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
        let mut mechanism = b"NULL".to_vec();
        mechanism.resize(20, 0);
        g.extend_from_slice(&mechanism);
        g.resize(64, 0);
        g
    }

    fn ready(identity: &[u8]) -> Vec<u8> {
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        for (name, value) in [
            (&b"Socket-Type"[..], &b"DEALER"[..]),
            (b"Identity", identity),
        ] {
            body.push(name.len() as u8);
            body.extend_from_slice(name);
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        let mut frame = vec![0x04, body.len() as u8];
        frame.extend_from_slice(&body);
        frame
    }

    fn long_frame_header(more: bool, len: u64) -> Vec<u8> {
        let mut h = vec![0x02 | u8::from(more)];
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    /// Feeds `bytes` one byte at a time (the worst split), returning the first refusal or
    /// pause.
    fn feed_bytewise(inspector: &mut Inspector, bytes: &[u8]) -> Result<Step, String> {
        for byte in bytes {
            match inspector.feed(std::slice::from_ref(byte))? {
                Step::Forward(1) => {}
                other => return Ok(other),
            }
        }
        Ok(Step::Forward(bytes.len()))
    }

    #[test]
    fn a_normal_session_passes_whatever_the_split() {
        let mut stream = greeting();
        stream.extend(ready(b"worker-1"));
        stream.extend([0x00, 3, b'a', b'b', b'c']);
        let mut whole = Inspector::new(1 << 20);
        assert_eq!(whole.feed(&stream), Ok(Step::Forward(stream.len())));
        assert_eq!(whole.identity.as_deref(), Some(&b"worker-1"[..]));
        let mut bytewise = Inspector::new(1 << 20);
        assert_eq!(
            feed_bytewise(&mut bytewise, &stream),
            Ok(Step::Forward(stream.len()))
        );
    }

    #[test]
    fn a_huge_frame_waits_for_authentication_then_is_bounded() {
        let mut stream = greeting();
        stream.extend(ready(b"w"));
        // Right after READY, no verdict is coming: refused at once.
        let mut early = stream.clone();
        early.extend(long_frame_header(false, 1 << 40));
        assert!(Inspector::new(1 << 20).feed(&early).is_err());
        // After JOIN and AUTH, it waits for the verdict.
        stream.extend([0x00, 1, b'j', 0x00, 1, b'a']);
        let prefix = stream.len();
        stream.extend(long_frame_header(false, 1 << 40));
        let mut inspector = Inspector::new(1 << 20);
        // Everything up to the frame's length field is forwarded; the length waits.
        let held = prefix + 1;
        assert_eq!(inspector.feed(&stream), Ok(Step::Forward(held)));
        assert_eq!(
            inspector.feed(&stream[held..]),
            Ok(Step::NeedsAuthentication(
                PeerIdentity::try_from(&b"w"[..]).ok()
            ))
        );
        inspector.authenticated();
        let refused = inspector.feed(&stream[held..]);
        assert!(refused.is_err(), "{refused:?}");
    }

    #[test]
    fn an_authenticated_worker_may_send_large_messages_in_many_frames() {
        let mut stream = greeting();
        stream.extend(ready(b"w"));
        let mut inspector = Inspector::new(10 << 20);
        inspector.feed(&stream).expect("handshake");
        inspector.authenticated();
        let mut message = long_frame_header(true, 40);
        message.extend(vec![0u8; 40]);
        message.extend(long_frame_header(false, 5 << 20));
        assert_eq!(inspector.feed(&message), Ok(Step::Forward(message.len())));
    }

    #[test]
    fn garbage_and_protocol_violations_are_refused() {
        let mut inspector = Inspector::new(1 << 20);
        assert!(inspector.feed(&[0x00; 64]).is_err(), "not a greeting");
        let mut inspector = Inspector::new(1 << 20);
        let mut stream = greeting();
        stream.extend([0x00, 3, b'a', b'b', b'c']);
        assert!(inspector.feed(&stream).is_err(), "a message before READY");
        let mut inspector = Inspector::new(1 << 20);
        let mut stream = greeting();
        stream.extend(long_frame_header(false, 1 << 30));
        stream[64] |= 0x04; // a command
        assert!(inspector.feed(&stream).is_err(), "a huge command");
        let mut curve = greeting();
        curve[12..17].copy_from_slice(b"CURVE");
        assert!(Inspector::new(1 << 20).feed(&curve).is_err(), "CURVE");
    }

    #[test]
    fn many_small_frames_count_against_the_limit_before_authentication() {
        let mut stream = greeting();
        stream.extend(ready(b"w"));
        let mut inspector = Inspector::new(1 << 20);
        inspector.feed(&stream).expect("handshake");
        inspector
            .feed(&[0x00, 1, b'j', 0x00, 1, b'a'])
            .expect("two messages");
        let frames: Vec<u8> = (0..10).flat_map(|_| [0x01, 0]).collect();
        let step = inspector.feed(&frames).expect("not refused outright");
        assert!(
            matches!(step, Step::Forward(n) if n < frames.len()),
            "{step:?}"
        );
    }
}
