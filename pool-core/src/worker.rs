//! One worker as the pool sees it: handshake, a reader task that routes replies by request id,
//! and the death report that every pending call receives when the worker goes away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::error::WorkerExit;
use crate::launcher::{FrameReceiver, FrameSender, LaunchError, Launched, ProcessHandle};
use crate::payload::Payload;
use crate::protocol::{
    self, CallShape, Codec, Hello, ItemError, Message, ProtocolError, RemoteError, Welcome,
    PROTOCOL_VERSION,
};

/// How long the reader waits for a process whose stream ended to exit, before it kills it: a
/// process that closed its stdout but lives on must not linger.
const EXIT_AFTER_EOF: Duration = Duration::from_secs(2);

/// How long the reader keeps reading a worker's channel after its process exited: what the
/// worker wrote before it died is delivered, but a descendant that holds the channel open (one
/// that left the worker's process group) cannot delay the crash report longer than this.
const EXIT_DRAIN: Duration = Duration::from_millis(100);

/// The most frames the writer takes from its queue for one batched write.
const WRITE_BATCH: usize = 256;

/// Replies a call's channel holds beside its stream window, for the terminal replies: the final
/// reply or CANCELLED, and the death report.
const REPLY_SLACK: usize = 2;

/// What a pending call receives from the reader.
///
/// A few words, the contents boxed: every call's reply channel allocates a block of 32 replies
/// up front, which at the contents' size (96 bytes) took the allocator's slow path per call.
#[derive(Debug)]
pub(crate) enum Reply {
    Chunk(Box<Payload>),
    End,
    Result(Result<Box<Payload>, Box<RemoteError>>),
    /// The result of a batch call in which some items failed: the list of values (`null` where
    /// an item failed) and the failures.
    Items(Box<(Payload, Vec<ItemError>)>),
    Cancelled,
    /// The worker went away before the call finished.
    Dead(Box<Death>),
}

/// How a worker went away, as its pending calls learn it.
#[derive(Debug, Clone)]
pub(crate) struct Death {
    pub exit: WorkerExit,
    /// The pool stopped the worker (shutdown), rather than it crashing or being killed.
    pub stopped: bool,
}

impl Reply {
    pub(crate) fn is_terminal(&self) -> bool {
        !matches!(self, Reply::Chunk(_))
    }
}

type Pending = HashMap<u64, mpsc::Sender<Reply>>;

/// The part of a worker shared with its reader task.
struct Routing {
    pending: Mutex<Pending>,
    /// Set by [`WorkerConn::terminate_connection`]; makes the reader stop with this reason.
    kill_reason: Mutex<Option<String>>,
    kill: tokio::sync::Notify,
    pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    death: OnceLock<Death>,
    /// Set by [`WorkerConn::stop`]: the pool is stopping this worker.
    stopping: AtomicBool,
    late_replies: Arc<AtomicU64>,
}

/// Called by the reader when the worker is gone, after every pending call has been told.
pub(crate) type OnExit = Box<dyn FnOnce(WorkerExit) + Send>;

/// What every connection of a pool shares.
#[derive(Clone)]
pub(crate) struct ConnSettings {
    pub pool: String,
    pub max_frame: usize,
    /// Stream items a worker may send ahead of the consumer.
    pub stream_window: u32,
    pub late_replies: Arc<AtomicU64>,
}

/// A live connection to a worker that has completed its handshake.
pub(crate) struct WorkerConn {
    pub(crate) id: String,
    pub(crate) hello: Hello,
    pub(crate) codec: Codec,
    max_frame: usize,
    stream_window: u32,
    /// Frames for the writer task, which owns the channel's sending half. A caller that is
    /// cancelled mid-send therefore can never leave half a frame on the wire.
    outbox: mpsc::UnboundedSender<Outgoing>,
    routing: Arc<Routing>,
    process: Option<Arc<dyn ProcessHandle>>,
    next_id: AtomicU64,
    reader: OnceLock<AbortHandle>,
    writer: AbortHandle,
}

/// What the writer task is asked to do.
enum Outgoing {
    Frame(Bytes),
    /// Close the sending direction (the worker sees end-of-file).
    Close,
}

impl Drop for WorkerConn {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
        self.writer.abort();
        if let Some(process) = &self.process {
            process.kill();
        }
    }
}

/// A failed handshake, and whether retrying can help.
pub(crate) struct HandshakeError {
    pub(crate) error: LaunchError,
    /// The worker said it cannot start (e.g. the app failed to import): retrying will not help.
    pub(crate) fatal: bool,
}

/// Why a CALL was not sent.
pub(crate) enum SendError {
    /// The worker is gone.
    Dead(Death),
    /// The frame would exceed `max_frame`; nothing was sent and the worker is untouched.
    TooLarge(usize),
    /// The message could not be encoded (nothing was sent).
    Encode(String),
}

/// How the handshake ended for the process, when it failed.
enum Failure {
    /// The worker broke the protocol or overran its time: kill it at once.
    Kill,
    /// The worker is ending by itself (it closed its channel, or said it cannot start).
    Exiting,
}

impl WorkerConn {
    /// Performs the handshake on a launched worker.
    pub(crate) async fn handshake(
        launched: Launched,
        worker_id: &str,
        settings: &ConnSettings,
        timeout: Duration,
    ) -> Result<(Arc<WorkerConn>, Box<dyn FrameReceiver>), HandshakeError> {
        let Launched { channel, process } = launched;
        let process: Option<Arc<dyn ProcessHandle>> = process.map(Arc::from);
        let mut receiver = channel.receiver;
        let mut sender = channel.sender;
        let first = match tokio::time::timeout(timeout, receiver.recv()).await {
            Err(_) => Err((format!("no HELLO within {timeout:?}"), false, Failure::Kill)),
            Ok(Err(err)) => Err((
                format!("channel failed before HELLO: {err}"),
                false,
                Failure::Kill,
            )),
            Ok(Ok(None)) => Err((
                "worker closed its channel before HELLO".into(),
                false,
                Failure::Exiting,
            )),
            Ok(Ok(Some(frame))) => match protocol::decode(frame) {
                Err(err) => Err((
                    format!("bad frame instead of HELLO: {err}"),
                    false,
                    Failure::Kill,
                )),
                Ok((Message::Hello(hello), _)) => Ok(hello),
                Ok((Message::StartupError { error }, _)) => {
                    let mut message = format!("worker could not start: {error}");
                    if let Some(tb) = &error.traceback {
                        message.push('\n');
                        message.push_str(tb.trim_end());
                    }
                    Err((message, true, Failure::Exiting))
                }
                Ok((other, _)) => Err((
                    format!("expected HELLO, got {}", other.type_name()),
                    false,
                    Failure::Kill,
                )),
            },
        };
        let fail = |message: String, fatal: bool, how: Failure| {
            let process = process.clone();
            async move {
                let stderr_tail = finish_process(process.as_deref(), how).await.1;
                HandshakeError {
                    error: LaunchError::new(message).with_stderr(stderr_tail),
                    fatal,
                }
            }
        };
        let hello = match first {
            Ok(hello) => hello,
            Err((message, fatal, how)) => return Err(fail(message, fatal, how).await),
        };
        if hello.protocol != PROTOCOL_VERSION || hello.max_in_flight == 0 {
            let message = format!(
                "unsupported HELLO: protocol {} (this pool speaks {PROTOCOL_VERSION}), \
                 max_in_flight {}; is the worker's pypool_worker the version this pool embeds?",
                hello.protocol, hello.max_in_flight
            );
            return Err(fail(message, true, Failure::Kill).await);
        }
        // The fastest codec both sides have: msgpack, else the stdlib's marshal, else JSON.
        let offers = |name: &str| hello.codecs.iter().any(|c| c == name);
        let codec = if offers("msgpack") {
            Codec::Msgpack
        } else if offers("marshal") {
            Codec::Marshal
        } else {
            Codec::Json
        };
        let welcome = Message::Welcome(Welcome {
            codec: codec.name().into(),
            pool: settings.pool.clone(),
            worker_id: worker_id.into(),
            max_frame: settings.max_frame as u64,
        });
        let sent = match protocol::encode(&welcome, Codec::Json, &[]) {
            Ok(body) => sender.send(body).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(err) = sent {
            return Err(fail(
                format!("could not send WELCOME: {err}"),
                false,
                Failure::Kill,
            )
            .await);
        }
        let routing = Arc::new(Routing {
            pending: Mutex::new(HashMap::new()),
            kill_reason: Mutex::new(None),
            kill: tokio::sync::Notify::new(),
            pings: Mutex::new(HashMap::new()),
            death: OnceLock::new(),
            stopping: AtomicBool::new(false),
            late_replies: settings.late_replies.clone(),
        });
        let (outbox, frames) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(sender, frames, routing.clone()));
        let conn = Arc::new(WorkerConn {
            id: worker_id.into(),
            hello,
            codec,
            max_frame: settings.max_frame,
            stream_window: settings.stream_window,
            outbox,
            routing,
            process,
            next_id: AtomicU64::new(1),
            reader: OnceLock::new(),
            writer: writer.abort_handle(),
        });
        Ok((conn, receiver))
    }

    /// Starts the reader task. `on_exit` runs once when the worker is gone.
    pub(crate) fn start_reader(
        self: &Arc<Self>,
        receiver: Box<dyn FrameReceiver>,
        on_exit: OnExit,
    ) {
        let reader = Reader {
            routing: self.routing.clone(),
            process: self.process.clone(),
            worker: self.id.clone(),
            codec: self.codec,
            outbox: self.outbox.clone(),
        };
        let task = tokio::spawn(reader.run(receiver, on_exit));
        // Set exactly once, right after the task is created.
        let _ = self.reader.set(task.abort_handle());
    }

    /// Whether the pool has the worker's process (a local worker), so that it sees the worker's
    /// exit from the process itself. A remote worker's disappearance shows only as silence.
    pub(crate) fn is_local(&self) -> bool {
        self.process.is_some()
    }

    /// The worker's process id (from the process handle, or HELLO for remote workers).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process
            .as_ref()
            .and_then(|p| p.pid())
            .or(u32::try_from(self.hello.pid).ok().filter(|pid| *pid != 0))
    }

    /// Resident memory, read from the operating system (not under any lock of the pool's).
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        self.process.as_ref().and_then(|p| p.rss_bytes())
    }

    /// Sends a CALL (a batch CALL for `CallShape::Batch`: `args` is then the list of the items'
    /// arguments)
    /// and registers its reply channel. The returned id is the call's request id.
    pub(crate) fn send_call(
        &self,
        command: &str,
        args: Payload,
        session: Option<&str>,
        timeout: Option<Duration>,
        shape: CallShape,
    ) -> Result<(u64, mpsc::Receiver<Reply>), SendError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = Message::Call {
            id,
            command: command.into(),
            args: args.value,
            session: session.map(str::to_owned),
            timeout_ms: timeout.map(|t| t.as_millis().min(u64::MAX as u128) as u64),
            window: Some(self.stream_window),
            batch: shape.is_batch(),
            scalars: matches!(shape, CallShape::Batch { scalars: true }),
        };
        let body = protocol::encode(&msg, self.codec, &args.attachments)
            .map_err(|err| SendError::Encode(err.to_string()))?;
        if body.len() > self.max_frame {
            return Err(SendError::TooLarge(body.len()));
        }
        let (tx, rx) = mpsc::channel(self.stream_window as usize + REPLY_SLACK);
        {
            let mut pending = self.routing.pending.lock();
            if let Some(death) = self.routing.death.get() {
                return Err(SendError::Dead(death.clone()));
            }
            pending.insert(id, tx);
        }
        if self.outbox.send(Outgoing::Frame(body)).is_err() {
            self.routing.pending.lock().remove(&id);
            return Err(SendError::Dead(self.death_report(
                "could not be sent the call: the connection is closed",
            )));
        }
        Ok((id, rx))
    }

    /// Sends CANCEL for a call (best effort).
    pub(crate) fn send_cancel(&self, id: u64) -> bool {
        self.send(&Message::Cancel { id }, &[]).is_ok()
    }

    /// Grants the worker `n` more stream items for call `id` (best effort: a worker that is gone
    /// needs no credit).
    pub(crate) fn send_credit(&self, id: u64, n: u32) {
        let _ = self.send(&Message::Credit { id, n }, &[]);
    }

    /// Forgets a call: any later reply to it is dropped and counted as late.
    pub(crate) fn forget(&self, id: u64) {
        self.routing.pending.lock().remove(&id);
    }

    /// Sends PING and waits up to `timeout` for PONG. `false` if it did not come.
    pub(crate) async fn ping(&self, timeout: Duration) -> bool {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.routing.pings.lock().insert(id, tx);
        let answered = self.send(&Message::Ping { id }, &[]).is_ok()
            && matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())));
        self.routing.pings.lock().remove(&id);
        answered
    }

    pub(crate) fn send_session_end(&self, session: &str) {
        let _ = self.send(
            &Message::SessionEnd {
                session: session.into(),
            },
            &[],
        );
    }

    /// Stops the worker: SHUTDOWN, then SIGTERM, then SIGKILL, each after `grace`; reaps it.
    /// Calls still pending learn that the pool stopped it.
    pub(crate) async fn stop(&self, grace: Duration) {
        self.routing.stopping.store(true, Ordering::Release);
        let _ = self.send(&Message::Shutdown, &[]);
        let Some(process) = &self.process else {
            let _ = self.outbox.send(Outgoing::Close);
            return;
        };
        if tokio::time::timeout(grace, process.wait()).await.is_ok() {
            return;
        }
        process.terminate();
        if tokio::time::timeout(grace, process.wait()).await.is_ok() {
            return;
        }
        process.kill();
        process.wait().await;
    }

    /// Kills the worker's process at once, without waiting (used on drop).
    pub(crate) fn kill(&self) {
        if let Some(process) = &self.process {
            process.kill();
        }
    }

    /// Gives up on the worker: kills its process and makes the reader stop, so that every pending
    /// call fails and the pool's exit handling runs, for remote workers too.
    pub(crate) fn terminate_connection(&self, reason: &str) {
        *self.routing.kill_reason.lock() = Some(format!("was killed by the pool: {reason}"));
        self.routing.kill.notify_one();
        self.kill();
    }

    /// Queues a message for the writer task. Fails only if the connection is already gone (or
    /// the message cannot be encoded); a write that fails later stops the reader, which fails
    /// every pending call.
    fn send(&self, msg: &Message, attachments: &[Bytes]) -> Result<(), String> {
        let body = protocol::encode(msg, self.codec, attachments).map_err(|e| e.to_string())?;
        self.outbox
            .send(Outgoing::Frame(body))
            .map_err(|_| "the connection is closed".to_owned())
    }

    fn death_report(&self, reason: &str) -> Death {
        self.routing.death.get().cloned().unwrap_or_else(|| Death {
            exit: WorkerExit {
                worker: self.id.clone(),
                reason: reason.to_owned(),
                exit: self.process.as_ref().and_then(|p| p.try_exit()),
                stderr_tail: self
                    .process
                    .as_ref()
                    .map(|p| p.stderr_tail())
                    .unwrap_or_default(),
            },
            stopped: self.routing.stopping.load(Ordering::Acquire),
        })
    }
}

/// Reaps a process whose channel is done with: killed at once, or given a moment to exit by
/// itself (then killed). Returns its exit status and stderr tail.
async fn finish_process(
    process: Option<&dyn ProcessHandle>,
    how: Failure,
) -> (Option<super::ExitInfo>, Vec<String>) {
    let Some(process) = process else {
        return (None, Vec::new());
    };
    if matches!(how, Failure::Kill) {
        process.kill();
    }
    let exit = match tokio::time::timeout(EXIT_AFTER_EOF, process.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            process.kill();
            process.wait().await
        }
    };
    (Some(exit), process.stderr_tail())
}

/// The reader task's state: routes every frame from the worker to the call it belongs to.
struct Reader {
    routing: Arc<Routing>,
    process: Option<Arc<dyn ProcessHandle>>,
    worker: String,
    codec: Codec,
    /// To cancel a call whose reply could not be taken.
    outbox: mpsc::UnboundedSender<Outgoing>,
}

impl Reader {
    async fn run(self, mut receiver: Box<dyn FrameReceiver>, on_exit: OnExit) {
        let routing = &self.routing;
        // A clean end of stream lets the process exit on its own; anything else is killed.
        let mut clean_eof = false;
        // The worker's exit is seen from its process, not inferred from the end of its stream:
        // a descendant may hold the channel open after the worker died. Once it has exited, what
        // it wrote before is still read, up to `EXIT_DRAIN`.
        let process = self.process.clone();
        let exited = async {
            match &process {
                Some(process) => process.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(exited);
        // Made once, not per frame: a Notified joins the Notify's waiter list when first
        // polled and leaves it when dropped, two locks a frame otherwise.
        let killed = routing.kill.notified();
        tokio::pin!(killed);
        let mut drain_until: Option<tokio::time::Instant> = None;
        let reason = loop {
            let received = tokio::select! {
                biased;
                _ = &mut killed => {
                    break routing.kill_reason.lock().take().unwrap_or_else(|| "was killed".into());
                }
                received = receiver.recv() => received,
                _ = &mut exited, if drain_until.is_none() => {
                    drain_until = Some(tokio::time::Instant::now() + EXIT_DRAIN);
                    continue;
                }
                _ = sleep_until_some(drain_until) => {
                    clean_eof = true;
                    break "exited".to_owned();
                }
            };
            let frame = match received {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    clean_eof = true;
                    break if drain_until.is_some() {
                        "exited".to_owned()
                    } else {
                        "closed its channel".to_owned()
                    };
                }
                Err(err) => break format!("channel failed: {err}"),
            };
            if let Err(reason) = self.handle(frame) {
                break reason;
            }
        };
        // Close our side so the worker sees EOF, then learn how it ended.
        drop(receiver);
        if !clean_eof {
            if let Some(process) = &self.process {
                process.kill();
            }
        }
        let how = if clean_eof {
            Failure::Exiting
        } else {
            Failure::Kill
        };
        let (exit, stderr_tail) = finish_process(self.process.as_deref(), how).await;
        let stopped = routing.stopping.load(Ordering::Acquire);
        let report = WorkerExit {
            worker: self.worker.clone(),
            reason: if stopped && clean_eof {
                "was stopped by the pool".to_owned()
            } else {
                reason
            },
            exit,
            stderr_tail,
        };
        let death = Death {
            exit: report.clone(),
            stopped,
        };
        let pending: Pending = {
            let mut pending = routing.pending.lock();
            // Publish the death while holding the lock so no call registers after the drain.
            let _ = routing.death.set(death.clone());
            std::mem::take(&mut *pending)
        };
        routing.pings.lock().clear();
        // The pool forgets the worker before its callers hear of the death, so a caller that
        // retries at once cannot be handed the dead worker again.
        on_exit(report);
        for (_, tx) in pending {
            // A full channel holds the call's final reply already; nothing is lost.
            let _ = tx.try_send(Reply::Dead(Box::new(death.clone())));
        }
    }

    /// Routes one frame. `Err` with the reason when the worker broke the protocol.
    fn handle(&self, frame: Bytes) -> Result<(), String> {
        let routing = &self.routing;
        let (msg, attachments) = match protocol::decode(frame) {
            Ok(decoded) => decoded,
            Err(ProtocolError::Value { id, reason }) => {
                // The frame is intact: only this call fails, and the worker lives on.
                let error = RemoteError {
                    kind: "pypool.UndecodableValue".into(),
                    message: format!(
                        "the worker's reply cannot be taken as it is: {reason} (values may nest \
                         at most {} levels, and integers must fit in 64 bits)",
                        protocol::MAX_DEPTH
                    ),
                    traceback: None,
                };
                if self.route(id, Reply::Result(Err(Box::new(error)))) {
                    // The handler may still be producing: stop it.
                    if let Ok(body) = protocol::encode(&Message::Cancel { id }, self.codec, &[]) {
                        let _ = self.outbox.send(Outgoing::Frame(body));
                    }
                }
                return Ok(());
            }
            Err(err) => return Err(format!("sent a bad frame: {err}")),
        };
        match msg {
            Message::Result {
                id,
                ok,
                error,
                errors,
            } => {
                let value = Payload {
                    value: ok.unwrap_or(Value::Null),
                    attachments,
                };
                let reply = match error {
                    Some(error) => Reply::Result(Err(Box::new(error))),
                    None if errors.is_empty() => Reply::Result(Ok(Box::new(value))),
                    None => Reply::Items(Box::new((value, errors))),
                };
                self.route_checked(id, reply)?;
            }
            Message::Chunk { id, value, .. } => {
                self.route_checked(id, Reply::Chunk(Box::new(Payload { value, attachments })))?
            }
            Message::End { id } => self.route_checked(id, Reply::End)?,
            Message::Cancelled { id } => self.route_checked(id, Reply::Cancelled)?,
            Message::Pong { id } => {
                if let Some(tx) = routing.pings.lock().remove(&id) {
                    let _ = tx.send(());
                }
            }
            Message::Goodbye => tracing::debug!(worker = %self.worker, "worker said goodbye"),
            other => return Err(format!("sent an unexpected {} message", other.type_name())),
        }
        Ok(())
    }

    /// [`route`](Self::route), but a worker that sends more stream items than it was granted
    /// (its call's channel is full) breaks the protocol: flow control is what bounds the pool's
    /// memory.
    fn route_checked(&self, id: u64, reply: Reply) -> Result<(), String> {
        match self.deliver(id, reply) {
            Delivered::Yes | Delivered::Late => Ok(()),
            Delivered::Overrun => Err(format!(
                "sent more stream items for call {id} than the pool granted (flow control)"
            )),
        }
    }

    /// Hands a reply to its call; `true` if a live call took it.
    fn route(&self, id: u64, reply: Reply) -> bool {
        matches!(self.deliver(id, reply), Delivered::Yes)
    }

    fn deliver(&self, id: u64, reply: Reply) -> Delivered {
        let routing = &self.routing;
        let mut pending = routing.pending.lock();
        let terminal = reply.is_terminal();
        let outcome = match pending.get(&id) {
            // The last slots are the terminal replies': a stream item that would take one is
            // beyond what the pool granted.
            Some(tx) if !terminal && tx.capacity() <= REPLY_SLACK => Delivered::Overrun,
            Some(tx) => match tx.try_send(reply) {
                Ok(()) => Delivered::Yes,
                Err(mpsc::error::TrySendError::Closed(_)) => Delivered::Late,
                Err(mpsc::error::TrySendError::Full(_)) => Delivered::Overrun,
            },
            None => Delivered::Late,
        };
        // An overrun keeps its call registered: the worker is dropped, and the call learns why.
        if terminal || matches!(outcome, Delivered::Late) {
            pending.remove(&id);
        }
        if matches!(outcome, Delivered::Late) {
            routing.late_replies.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                call_id = id,
                "dropped a reply for an unknown or finished call"
            );
        }
        outcome
    }
}

enum Delivered {
    Yes,
    /// Nobody waits for it any more: dropped and counted.
    Late,
    /// The call's channel is full: the worker ignored flow control.
    Overrun,
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Owns the sending half: writes queued frames one whole frame at a time. If a write fails the
/// worker is unusable, so the reader is told to stop.
async fn write_loop(
    mut sender: Box<dyn FrameSender>,
    mut frames: mpsc::UnboundedReceiver<Outgoing>,
    routing: Arc<Routing>,
) {
    let mut batch = Vec::new();
    let mut closing = false;
    while !closing {
        // Everything queued meanwhile goes out together: one write for many calls when the
        // pool is busy, and no waiting when it is not.
        match frames.recv().await {
            Some(Outgoing::Frame(body)) => batch.push(body),
            Some(Outgoing::Close) | None => break,
        }
        while batch.len() < WRITE_BATCH {
            match frames.try_recv() {
                Ok(Outgoing::Frame(body)) => batch.push(body),
                Ok(Outgoing::Close) => {
                    closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if let Err(err) = sender.send_many(&mut batch).await {
            *routing.kill_reason.lock() = Some(format!("could not be written to: {err}"));
            routing.kill.notify_one();
            return;
        }
    }
    let _ = sender.close().await;
}
