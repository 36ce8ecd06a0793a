//! One worker as the pool sees it: handshake, a reader task that routes replies by request id,
//! and the death report that every pending call receives when the worker goes away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::error::WorkerExit;
use crate::launcher::{FrameReceiver, FrameSender, LaunchError, Launched, ProcessHandle};
use crate::payload::Payload;
use crate::protocol::{self, Codec, Hello, Message, RemoteError, Welcome, PROTOCOL_VERSION};

/// How long the reader waits for a process whose stream ended to exit, before it kills it: a
/// process that closed its stdout but lives on must not linger.
const EXIT_AFTER_EOF: Duration = Duration::from_secs(2);

/// How long the reader keeps reading a worker's channel after its process exited: what the
/// worker wrote before it died is delivered, but a descendant that holds the channel open (one
/// that left the worker's process group) cannot delay the crash report longer than this.
const EXIT_DRAIN: Duration = Duration::from_millis(100);

/// What a pending call receives from the reader.
#[derive(Debug)]
pub(crate) enum Reply {
    Chunk(Payload),
    End,
    Result(Result<Payload, RemoteError>),
    Cancelled,
    /// The worker went away before the call finished.
    Dead(WorkerExit),
}

impl Reply {
    pub(crate) fn is_terminal(&self) -> bool {
        !matches!(self, Reply::Chunk(_))
    }
}

type Pending = HashMap<u64, mpsc::UnboundedSender<Reply>>;

/// The part of a worker shared with its reader task.
struct Routing {
    pending: Mutex<Pending>,
    /// Set by [`WorkerConn::terminate_connection`]; makes the reader stop with this reason.
    kill_reason: Mutex<Option<String>>,
    kill: tokio::sync::Notify,
    pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    death: OnceLock<WorkerExit>,
    late_replies: Arc<AtomicU64>,
}

/// Called by the reader when the worker is gone, after every pending call has been told.
pub(crate) type OnExit = Box<dyn FnOnce(WorkerExit) + Send>;

/// A live connection to a worker that has completed its handshake.
pub(crate) struct WorkerConn {
    pub(crate) id: String,
    pub(crate) hello: Hello,
    pub(crate) codec: Codec,
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

impl WorkerConn {
    /// Performs the handshake on a launched worker and starts its reader.
    pub(crate) async fn handshake(
        launched: Launched,
        pool: &str,
        worker_id: &str,
        max_frame: usize,
        timeout: Duration,
        late_replies: Arc<AtomicU64>,
    ) -> Result<(Arc<WorkerConn>, Box<dyn FrameReceiver>), HandshakeError> {
        let Launched { channel, process } = launched;
        let process: Option<Arc<dyn ProcessHandle>> = process.map(Arc::from);
        let mut receiver = channel.receiver;
        let mut sender = channel.sender;
        let fail = |message: String, fatal: bool| HandshakeError {
            error: LaunchError::new(message),
            fatal,
        };
        let first = match tokio::time::timeout(timeout, receiver.recv()).await {
            Err(_) => Err(fail(format!("no HELLO within {timeout:?}"), false)),
            Ok(Err(err)) => Err(fail(format!("channel failed before HELLO: {err}"), false)),
            Ok(Ok(None)) => Err(fail("worker closed its channel before HELLO".into(), false)),
            Ok(Ok(Some(frame))) => match protocol::decode(frame) {
                Err(err) => Err(fail(format!("bad frame instead of HELLO: {err}"), false)),
                Ok((Message::Hello(hello), _)) => Ok(hello),
                Ok((Message::StartupError { error }, _)) => {
                    let mut message = format!("worker could not start: {error}");
                    if let Some(tb) = &error.traceback {
                        message.push('\n');
                        message.push_str(tb.trim_end());
                    }
                    Err(fail(message, true))
                }
                Ok((other, _)) => Err(fail(
                    format!("expected HELLO, got {}", other.type_name()),
                    false,
                )),
            },
        };
        let hello = match first {
            Ok(hello) => hello,
            Err(mut err) => {
                err.error.stderr_tail = finish_process(process.as_deref()).await.1;
                return Err(err);
            }
        };
        if hello.protocol != PROTOCOL_VERSION || hello.max_in_flight == 0 {
            let mut err = fail(
                format!(
                    "unsupported HELLO: protocol {} (this pool speaks {PROTOCOL_VERSION}), max_in_flight {}",
                    hello.protocol, hello.max_in_flight
                ),
                true,
            );
            err.error.stderr_tail = finish_process(process.as_deref()).await.1;
            return Err(err);
        }
        let codec = if hello.codecs.iter().any(|c| c == "msgpack") {
            Codec::Msgpack
        } else {
            Codec::Json
        };
        let welcome = Message::Welcome(Welcome {
            codec: codec.name().into(),
            pool: pool.into(),
            worker_id: worker_id.into(),
            max_frame: max_frame as u64,
        });
        let sent = match protocol::encode(&welcome, Codec::Json, &[]) {
            Ok(body) => sender.send(body).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(err) = sent {
            let mut err = fail(format!("could not send WELCOME: {err}"), false);
            err.error.stderr_tail = finish_process(process.as_deref()).await.1;
            return Err(err);
        }
        let routing = Arc::new(Routing {
            pending: Mutex::new(HashMap::new()),
            kill_reason: Mutex::new(None),
            kill: tokio::sync::Notify::new(),
            pings: Mutex::new(HashMap::new()),
            death: OnceLock::new(),
            late_replies,
        });
        let (outbox, frames) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(sender, frames, routing.clone()));
        let conn = Arc::new(WorkerConn {
            id: worker_id.into(),
            hello,
            codec,
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
        let routing = self.routing.clone();
        let process = self.process.clone();
        let id = self.id.clone();
        let task = tokio::spawn(read_loop(receiver, routing, process, id, on_exit));
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

    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        self.process.as_ref().and_then(|p| p.rss_bytes())
    }

    /// Sends a CALL and registers its reply channel. The returned id is the call's request id.
    pub(crate) async fn send_call(
        &self,
        command: &str,
        args: Payload,
        session: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Reply>), WorkerExit> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut pending = self.routing.pending.lock();
            if let Some(death) = self.routing.death.get() {
                return Err(death.clone());
            }
            pending.insert(id, tx);
        }
        let msg = Message::Call {
            id,
            command: command.into(),
            args: args.value,
            session: session.map(str::to_owned),
            timeout_ms: timeout.map(|t| t.as_millis().min(u64::MAX as u128) as u64),
        };
        if let Err(reason) = self.send(&msg, &args.attachments).await {
            self.routing.pending.lock().remove(&id);
            return Err(self.exit_report(format!("could not be sent the call: {reason}")));
        }
        Ok((id, rx))
    }

    /// Sends CANCEL for a call (best effort).
    pub(crate) async fn send_cancel(&self, id: u64) -> bool {
        self.send(&Message::Cancel { id }, &[]).await.is_ok()
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
        let answered = self.send(&Message::Ping { id }, &[]).await.is_ok()
            && matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())));
        self.routing.pings.lock().remove(&id);
        answered
    }

    pub(crate) async fn send_session_end(&self, session: &str) {
        let _ = self
            .send(
                &Message::SessionEnd {
                    session: session.into(),
                },
                &[],
            )
            .await;
    }

    /// Stops the worker: SHUTDOWN, then SIGTERM, then SIGKILL, each after `grace`; reaps it.
    pub(crate) async fn stop(&self, grace: Duration) {
        let _ = self.send(&Message::Shutdown, &[]).await;
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

    /// Queues a message for the writer task. Fails only if the connection is already gone; a
    /// write that fails later stops the reader, which fails every pending call.
    async fn send(&self, msg: &Message, attachments: &[Bytes]) -> Result<(), String> {
        let body = protocol::encode(msg, self.codec, attachments).map_err(|e| e.to_string())?;
        self.outbox
            .send(Outgoing::Frame(body))
            .map_err(|_| "the connection is closed".to_owned())
    }

    fn exit_report(&self, reason: String) -> WorkerExit {
        self.routing
            .death
            .get()
            .cloned()
            .unwrap_or_else(|| WorkerExit {
                worker: self.id.clone(),
                reason,
                exit: self.process.as_ref().and_then(|p| p.try_exit()),
                stderr_tail: self
                    .process
                    .as_ref()
                    .map(|p| p.stderr_tail())
                    .unwrap_or_default(),
            })
    }
}

/// Reaps a process whose channel is done with: waits briefly, then kills. Returns its exit status
/// and stderr tail.
async fn finish_process(
    process: Option<&dyn ProcessHandle>,
) -> (Option<super::ExitInfo>, Vec<String>) {
    let Some(process) = process else {
        return (None, Vec::new());
    };
    let exit = match tokio::time::timeout(EXIT_AFTER_EOF, process.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            process.kill();
            process.wait().await
        }
    };
    (Some(exit), process.stderr_tail())
}

async fn read_loop(
    mut receiver: Box<dyn FrameReceiver>,
    routing: Arc<Routing>,
    process: Option<Arc<dyn ProcessHandle>>,
    worker: String,
    on_exit: OnExit,
) {
    // A clean end of stream lets the process exit on its own; anything else is killed at once.
    let mut clean_eof = false;
    // The worker's exit is seen from its process, not inferred from the end of its stream: a
    // descendant may hold the channel open after the worker died. Once it has exited, what it
    // wrote before is still read, up to `EXIT_DRAIN`.
    let exited = async {
        match &process {
            Some(process) => process.wait().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(exited);
    let mut drain_until: Option<tokio::time::Instant> = None;
    let reason = loop {
        let received = tokio::select! {
            biased;
            _ = routing.kill.notified() => {
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
        let (msg, attachments) = match protocol::decode(frame) {
            Ok(decoded) => decoded,
            Err(err) => break format!("sent a bad frame: {err}"),
        };
        match msg {
            Message::Result { id, ok, error } => {
                let reply = match error {
                    Some(error) => Reply::Result(Err(error)),
                    None => Reply::Result(Ok(Payload {
                        value: ok.unwrap_or(Value::Null),
                        attachments,
                    })),
                };
                route(&routing, id, reply);
            }
            Message::Chunk { id, value, .. } => {
                route(&routing, id, Reply::Chunk(Payload { value, attachments }))
            }
            Message::End { id } => route(&routing, id, Reply::End),
            Message::Cancelled { id } => route(&routing, id, Reply::Cancelled),
            Message::Pong { id } => {
                if let Some(tx) = routing.pings.lock().remove(&id) {
                    let _ = tx.send(());
                }
            }
            Message::Goodbye => tracing::debug!(worker = %worker, "worker said goodbye"),
            other => break format!("sent an unexpected {} message", other.type_name()),
        }
    };
    // Close our side so the worker sees EOF, then learn how it ended.
    drop(receiver);
    if !clean_eof {
        if let Some(process) = &process {
            process.kill();
        }
    }
    let (exit, stderr_tail) = finish_process(process.as_deref()).await;
    let report = WorkerExit {
        worker: worker.clone(),
        reason,
        exit,
        stderr_tail,
    };
    let pending: Pending = {
        let mut pending = routing.pending.lock();
        // Publish the death while holding the lock so no call registers after the drain.
        let _ = routing.death.set(report.clone());
        std::mem::take(&mut *pending)
    };
    routing.pings.lock().clear();
    // The pool forgets the worker before its callers hear of the death, so a caller that retries
    // at once cannot be handed the dead worker again.
    on_exit(report.clone());
    for (_, tx) in pending {
        let _ = tx.send(Reply::Dead(report.clone()));
    }
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
    while let Some(outgoing) = frames.recv().await {
        match outgoing {
            Outgoing::Frame(body) => {
                if let Err(err) = sender.send(body).await {
                    *routing.kill_reason.lock() = Some(format!("could not be written to: {err}"));
                    routing.kill.notify_one();
                    return;
                }
            }
            Outgoing::Close => break,
        }
    }
    let _ = sender.close().await;
}

fn route(routing: &Routing, id: u64, reply: Reply) {
    let mut pending = routing.pending.lock();
    let terminal = reply.is_terminal();
    let delivered = match pending.get(&id) {
        Some(tx) => tx.send(reply).is_ok(),
        None => false,
    };
    if terminal || !delivered {
        pending.remove(&id);
    }
    if !delivered {
        routing.late_replies.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            call_id = id,
            "dropped a reply for an unknown or finished call"
        );
    }
}
