//! A launcher whose workers are tokio tasks speaking the real protocol over in-memory channels.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pool_core::protocol::{self, Codec, Hello, ItemError, Message, RemoteError};
use pool_core::{ExitInfo, LaunchError, Launched, Launcher, ProcessHandle, WorkerSpec};
use serde_json::Value;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::AbortHandle;

use crate::channel::{memory_channel, PeerEnd};
use crate::script::{Action, FakeCall, FakeReply, Script, StartBehavior};

/// What a [`FakeLauncher`] has seen, for assertions.
#[derive(Default)]
struct Registry {
    launched: AtomicU64,
    alive: AtomicUsize,
    max_alive: AtomicUsize,
    live_pids: Mutex<HashSet<u32>>,
    session_ends: Mutex<Vec<(u64, String)>>,
    calls_seen: AtomicU64,
    calls_started: AtomicU64,
    items_sent: AtomicU64,
}

/// A [`Launcher`] for pool logic tests: each "process" is a tokio task that follows a [`Script`]
/// on tokio time, so tests run on paused time, deterministically and fast.
///
/// An app whose name contains `broken_import` fails to import (STARTUP_ERROR), like the
/// conformance suite's broken app.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::{sync::Arc, time::Duration};
/// use pool_core::{Pool, PoolConfig};
/// use pool_testkit::{FakeLauncher, FakeReply};
/// use serde_json::json;
///
/// let launcher = FakeLauncher::builder()
///     .start_delay(Duration::from_secs(2))
///     .on("predict", |_| FakeReply::ok(json!(0.9)).after(Duration::from_millis(50)))
///     .build();
/// let pool = Pool::start(PoolConfig::new("fake").size(2), launcher.clone()).await.unwrap();
/// assert_eq!(pool.call("predict", json!({})).await.unwrap().value, json!(0.9));
/// pool.shutdown(Duration::from_secs(1)).await;
/// launcher.assert_all_gone();
/// # }
/// ```
#[derive(Clone)]
pub struct FakeLauncher {
    script: Arc<Script>,
    registry: Arc<Registry>,
}

/// Builds a [`FakeLauncher`].
pub struct FakeLauncherBuilder {
    script: Script,
}

impl FakeLauncherBuilder {
    /// Every worker waits `delay` before HELLO.
    pub fn start_delay(mut self, delay: Duration) -> Self {
        self.script.start = Arc::new(move |_| StartBehavior::Ok { delay });
        self
    }

    /// Decides each launch's behaviour from its number (0, 1, 2, … across the launcher's life).
    pub fn on_start(mut self, f: impl Fn(u64) -> StartBehavior + Send + Sync + 'static) -> Self {
        self.script.start = Arc::new(f);
        self
    }

    /// Scripts a command.
    pub fn on(
        mut self,
        command: &str,
        f: impl Fn(&FakeCall) -> FakeReply + Send + Sync + 'static,
    ) -> Self {
        self.script.on(command, f);
        self
    }

    /// Calls each worker accepts at once (HELLO's `max_in_flight`). Default 1.
    pub fn max_in_flight(mut self, n: u64) -> Self {
        self.script.max_in_flight = n;
        self
    }

    /// Decides per worker (launch number) whether it answers pings. Default: all do.
    pub fn answer_pings(mut self, f: impl Fn(u64) -> bool + Send + Sync + 'static) -> Self {
        self.script.answer_pings = Arc::new(f);
        self
    }

    /// Whether workers offer MessagePack (default yes; no means JSON after the handshake too).
    pub fn msgpack(mut self, on: bool) -> Self {
        self.script.msgpack = on;
        self
    }

    /// Whether launches return no process handle, as for a worker that joined from another
    /// machine: the pool then learns of the worker's death only from its silence (missed pings)
    /// or its closed channel. Default: local workers with a process handle.
    pub fn remote(mut self, remote: bool) -> Self {
        self.script.remote = remote;
        self
    }

    /// The launcher.
    pub fn build(self) -> Arc<FakeLauncher> {
        Arc::new(FakeLauncher {
            script: Arc::new(self.script),
            registry: Arc::new(Registry::default()),
        })
    }
}

impl FakeLauncher {
    /// A builder with the standard commands and instant start.
    pub fn builder() -> FakeLauncherBuilder {
        FakeLauncherBuilder {
            script: Script::default(),
        }
    }

    /// Workers launched so far (including failed starts that got a process).
    pub fn launched(&self) -> u64 {
        self.registry.launched.load(Ordering::SeqCst)
    }

    /// Fake processes alive now.
    pub fn alive(&self) -> usize {
        self.registry.alive.load(Ordering::SeqCst)
    }

    /// The most fake processes ever alive at once.
    pub fn max_alive(&self) -> usize {
        self.registry.max_alive.load(Ordering::SeqCst)
    }

    /// CALL messages the workers received.
    pub fn calls_seen(&self) -> u64 {
        self.registry.calls_seen.load(Ordering::SeqCst)
    }

    /// Scripted calls that started running (not those cancelled while queued at the worker).
    pub fn calls_started(&self) -> u64 {
        self.registry.calls_started.load(Ordering::SeqCst)
    }

    /// Stream items the workers have sent.
    pub fn items_sent(&self) -> u64 {
        self.registry.items_sent.load(Ordering::SeqCst)
    }

    /// SESSION_END messages received, as (worker launch number, session).
    pub fn session_ends(&self) -> Vec<(u64, String)> {
        self.registry
            .session_ends
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Whether the fake process with this pid is alive.
    pub fn is_alive(&self, pid: u32) -> bool {
        self.registry
            .live_pids
            .lock()
            .map(|p| p.contains(&pid))
            .unwrap_or(false)
    }

    /// Panics unless every fake process this launcher started has exited.
    pub fn assert_all_gone(&self) {
        assert_eq!(
            self.alive(),
            0,
            "fake worker processes still alive: {:?}",
            self.registry
                .live_pids
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default()
        );
    }
}

#[async_trait]
impl Launcher for FakeLauncher {
    fn name(&self) -> &str {
        "fake"
    }

    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        let number = self.registry.launched.fetch_add(1, Ordering::SeqCst);
        let behavior = if spec.app.contains("broken_import") {
            // Like the conformance suite's broken app.
            StartBehavior::StartupError("No module named 'missing_dependency'".into())
        } else {
            (self.script.start)(number)
        };
        if let StartBehavior::FailLaunch(message) = &behavior {
            return Err(LaunchError::new(message.clone()));
        }
        let pid = 1000 + number as u32;
        let (channel, peer) = memory_channel(64);
        let (exit_tx, exit_rx) = watch::channel(None);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let alive = self.registry.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.registry.max_alive.fetch_max(alive, Ordering::SeqCst);
        if let Ok(mut pids) = self.registry.live_pids.lock() {
            pids.insert(pid);
        }
        let exit_tx = Arc::new(exit_tx);
        let worker = FakeWorker {
            number,
            pid,
            script: self.script.clone(),
            registry: self.registry.clone(),
            worker_id: spec.worker_id.clone(),
            stderr: stderr.clone(),
            sessions: HashMap::new(),
        };
        let task_exit = exit_tx.clone();
        let task_registry = self.registry.clone();
        let task = tokio::spawn(async move {
            let code = worker.run(peer, behavior).await;
            // Negative codes stand for death by signal, as in Python's subprocess.
            let (code, signal) = if code < 0 {
                (None, Some(-code))
            } else {
                (Some(code), None)
            };
            task_exit.send_if_modified(|exit| set_exit(exit, code, signal));
            mark_gone(&task_registry, pid);
        });
        if self.script.remote {
            // A remote worker's process is out of the pool's reach: it ends by itself once the
            // pool drops its connection.
            return Ok(Launched {
                channel,
                process: None,
            });
        }
        let process = FakeProcess {
            pid,
            task: task.abort_handle(),
            exit_tx,
            exit_rx,
            stderr,
            registry: self.registry.clone(),
        };
        Ok(Launched {
            channel,
            process: Some(Box::new(process)),
        })
    }
}

fn set_exit(exit: &mut Option<ExitInfo>, code: Option<i32>, signal: Option<i32>) -> bool {
    if exit.is_some() {
        return false;
    }
    *exit = Some(ExitInfo { code, signal });
    true
}

fn mark_gone(registry: &Registry, pid: u32) {
    let removed = registry
        .live_pids
        .lock()
        .map(|mut p| p.remove(&pid))
        .unwrap_or(false);
    if removed {
        registry.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The [`ProcessHandle`] of a fake worker: killing it aborts the task.
struct FakeProcess {
    pid: u32,
    task: AbortHandle,
    exit_tx: Arc<watch::Sender<Option<ExitInfo>>>,
    exit_rx: watch::Receiver<Option<ExitInfo>>,
    stderr: Arc<Mutex<Vec<String>>>,
    registry: Arc<Registry>,
}

impl FakeProcess {
    fn end(&self, signal: i32) {
        self.task.abort();
        self.exit_tx
            .send_if_modified(|exit| set_exit(exit, None, Some(signal)));
        mark_gone(&self.registry, self.pid);
    }
}

#[async_trait]
impl ProcessHandle for FakeProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }
    fn terminate(&self) {
        self.end(15);
    }
    fn kill(&self) {
        self.end(9);
    }
    async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        let result = rx.wait_for(Option::is_some).await.map(|exit| *exit);
        match result {
            Ok(Some(exit)) => exit,
            _ => ExitInfo::default(),
        }
    }
    fn try_exit(&self) -> Option<ExitInfo> {
        *self.exit_rx.borrow()
    }
    fn rss_bytes(&self) -> Option<u64> {
        Some(10 * 1024 * 1024)
    }
    fn stderr_tail(&self) -> Vec<String> {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        if self.exit_rx.borrow().is_none() {
            self.end(9);
        }
    }
}

/// Events from a worker's call tasks to its main loop.
enum Event {
    Send(Message, Vec<Bytes>),
    Raw(Bytes),
    Done(u64),
    Exit(i32),
    Killed(i32),
}

struct FakeWorker {
    number: u64,
    pid: u32,
    script: Arc<Script>,
    registry: Arc<Registry>,
    worker_id: String,
    stderr: Arc<Mutex<Vec<String>>>,
    sessions: HashMap<String, HashMap<String, Value>>,
}

impl FakeWorker {
    fn log(&self, line: String) {
        if let Ok(mut stderr) = self.stderr.lock() {
            stderr.push(line);
        }
    }

    /// Runs the worker; returns its exit code.
    async fn run(mut self, mut peer: PeerEnd, behavior: StartBehavior) -> i32 {
        let json = |msg: &Message| protocol::encode(msg, Codec::Json, &[]).ok();
        let crash_after_hello = match &behavior {
            StartBehavior::CrashAfterHello(code) => Some(*code),
            _ => None,
        };
        match behavior {
            StartBehavior::Ok { delay } => tokio::time::sleep(delay).await,
            StartBehavior::FailLaunch(_) => return 1,
            StartBehavior::StartupError(message) => {
                let msg = Message::StartupError {
                    error: RemoteError {
                        kind: "ImportError".into(),
                        message: message.clone(),
                        traceback: Some(format!(
                            "Traceback (most recent call last):\nImportError: {message}"
                        )),
                    },
                };
                if let Some(body) = json(&msg) {
                    let _ = peer.tx.send(body).await;
                }
                self.log(format!("ImportError: {message}"));
                return 2;
            }
            StartBehavior::ExitBeforeHello(line) => {
                self.log(line);
                return 1;
            }
            StartBehavior::Hang => std::future::pending::<()>().await,
            StartBehavior::Garbage => {
                let _ = peer.tx.send(Bytes::from_static(b"\xffnot a frame")).await;
                return 3;
            }
            StartBehavior::GarbageThenHang => {
                let _ = peer.tx.send(Bytes::from_static(b"\xffnot a frame")).await;
                std::future::pending::<()>().await;
            }
            StartBehavior::CrashAfterHello(_) => {}
        }
        let mut codecs = vec!["json".to_owned()];
        if self.script.msgpack {
            codecs.push("msgpack".into());
        }
        let hello = Message::Hello(Hello {
            protocol: pool_core::protocol::PROTOCOL_VERSION,
            runtime: "pool-testkit/fake".into(),
            python: "fake".into(),
            pid: u64::from(self.pid),
            worker_id: self.worker_id.clone(),
            codecs,
            commands: self
                .script
                .commands
                .keys()
                .cloned()
                .chain(["remember".to_owned(), "recall".to_owned()])
                .collect(),
            max_in_flight: self.script.max_in_flight,
            features: vec!["stream".into(), "cancel".into()],
        });
        let Some(body) = json(&hello) else { return 1 };
        if peer.tx.send(body).await.is_err() {
            return 0;
        }
        let codec = match peer.rx.recv().await.map(protocol::decode) {
            Some(Ok((Message::Welcome(w), _))) => Codec::from_name(&w.codec).unwrap_or(Codec::Json),
            _ => return 1,
        };
        if let Some(code) = crash_after_hello {
            self.log(format!(
                "fake worker crashing right after its start, code {code}"
            ));
            return code;
        }
        let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
        // Like the Python runtime: calls beyond max_in_flight wait, in arrival order.
        let slots = Arc::new(Semaphore::new(
            usize::try_from(self.script.max_in_flight)
                .unwrap_or(1)
                .max(1),
        ));
        let mut running: HashMap<u64, Running> = HashMap::new();
        let mut nth = 0u64;
        loop {
            let frame = tokio::select! {
                frame = peer.rx.recv() => frame,
                Some(event) = events.recv() => {
                    match event {
                        Event::Send(msg, att) => {
                            if matches!(msg, Message::Chunk { .. }) {
                                self.registry.items_sent.fetch_add(1, Ordering::SeqCst);
                            }
                            let Ok(body) = protocol::encode(&msg, codec, &att) else { return 1 };
                            if peer.tx.send(body).await.is_err() { return 0; }
                        }
                        Event::Raw(body) => {
                            if peer.tx.send(body).await.is_err() { return 0; }
                        }
                        Event::Done(id) => { running.remove(&id); }
                        Event::Exit(code) => {
                            self.log(format!("fake worker exiting with code {code}"));
                            return code;
                        }
                        Event::Killed(signal) => {
                            self.log(format!("fake worker killed by signal {signal}"));
                            return -signal;
                        }
                    }
                    continue;
                }
            };
            let Some(frame) = frame else { return 0 };
            let Ok((msg, attachments)) = protocol::decode(frame) else {
                self.log("bad frame from the pool".into());
                return 3;
            };
            match msg {
                Message::Call {
                    id,
                    command,
                    args,
                    session,
                    window,
                    batch,
                    ..
                } => {
                    self.registry.calls_seen.fetch_add(1, Ordering::SeqCst);
                    let call = FakeCall {
                        worker: self.number,
                        nth,
                        command: command.clone(),
                        args,
                        session,
                        attachments,
                    };
                    nth += 1;
                    if let Some(value) = self.builtin(&call) {
                        let reply = Message::Result {
                            id,
                            ok: Some(value),
                            error: None,
                            errors: Vec::new(),
                        };
                        let _ = events_tx.send(Event::Send(reply, Vec::new()));
                        continue;
                    }
                    let reply = match self.script.commands.get(&command) {
                        Some(script) if batch => batch_reply(script.as_ref(), &call),
                        Some(script) => script(&call),
                        None => {
                            let mut known: Vec<_> = self.script.commands.keys().cloned().collect();
                            known.sort();
                            FakeReply::error(
                                "UnknownCommand",
                                &format!(
                                    "unknown command '{command}'; known: {}",
                                    known.join(", ")
                                ),
                            )
                        }
                    };
                    if reply.action == Action::Hang {
                        // Like a handler stuck in C code holding the GIL: nothing is read or
                        // answered any more, not CANCEL, PING or SHUTDOWN. A remote one is gone
                        // for the pool once the pool drops its connection.
                        tokio::time::sleep(reply.latency).await;
                        if self.script.remote {
                            peer.tx.closed().await;
                            return -9;
                        }
                        std::future::pending::<()>().await;
                    }
                    let cancellable = reply.cancellable;
                    let events = events_tx.clone();
                    let credits = Arc::new(Semaphore::new(
                        window.map_or(Semaphore::MAX_PERMITS, |w| w as usize),
                    ));
                    let task = tokio::spawn(perform(
                        id,
                        command,
                        reply,
                        events,
                        credits.clone(),
                        slots.clone(),
                        self.registry.clone(),
                    ));
                    running.insert(
                        id,
                        Running {
                            task: task.abort_handle(),
                            cancellable,
                            credits,
                        },
                    );
                }
                Message::Cancel { id } => {
                    if let Some(call) = running.get(&id).filter(|call| call.cancellable) {
                        call.task.abort();
                        running.remove(&id);
                        let _ = events_tx.send(Event::Send(Message::Cancelled { id }, Vec::new()));
                    }
                }
                Message::Credit { id, n } => {
                    if let Some(call) = running.get(&id) {
                        call.credits.add_permits(n as usize);
                    }
                }
                Message::Ping { id } => {
                    if (self.script.answer_pings)(self.number) {
                        let _ = events_tx.send(Event::Send(Message::Pong { id }, Vec::new()));
                    }
                }
                Message::SessionEnd { session } => {
                    self.sessions.remove(&session);
                    if let Ok(mut ends) = self.registry.session_ends.lock() {
                        ends.push((self.number, session));
                    }
                }
                Message::Shutdown => {
                    if let Ok(body) = protocol::encode(&Message::Goodbye, codec, &[]) {
                        let _ = peer.tx.send(body).await;
                    }
                    return 0;
                }
                other => {
                    self.log(format!("unexpected {} from the pool", other.type_name()));
                    return 3;
                }
            }
        }
    }

    /// Per-session state, kept in the worker like the Python runtime's `ctx.session`: `remember`
    /// and `recall`, unless the script overrides them.
    fn builtin(&mut self, call: &FakeCall) -> Option<Value> {
        if self.script.commands.contains_key(&call.command) {
            return None;
        }
        let session = call.session.clone().unwrap_or_default();
        let key = call.args["key"].as_str().unwrap_or("").to_owned();
        match call.command.as_str() {
            "remember" => {
                let value = call.args["value"].clone();
                self.sessions.entry(session).or_default().insert(key, value);
                Some(Value::Null)
            }
            "recall" => Some(
                self.sessions
                    .get(&session)
                    .and_then(|s| s.get(&key))
                    .cloned()
                    .unwrap_or(Value::Null),
            ),
            _ => None,
        }
    }
}

/// A call a fake worker is running.
struct Running {
    task: AbortHandle,
    cancellable: bool,
    /// Stream items it may still send (flow control).
    credits: Arc<Semaphore>,
}

async fn perform(
    id: u64,
    command: String,
    reply: FakeReply,
    events: mpsc::UnboundedSender<Event>,
    credits: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    registry: Arc<Registry>,
) {
    // Queued until one of the worker's max_in_flight slots is free (a CANCEL meanwhile aborts
    // this task: the call never starts).
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    registry.calls_started.fetch_add(1, Ordering::SeqCst);
    // A zero sleep would still wait for the timer wheel's next millisecond tick.
    if !reply.latency.is_zero() {
        tokio::time::sleep(reply.latency).await;
    }
    // `false` once the worker is gone: its calls end with it.
    let send = |msg: Message| events.send(Event::Send(msg, Vec::new())).is_ok();
    match reply.action {
        Action::Ok(value, attachments) => {
            let _ = events.send(Event::Send(
                Message::Result {
                    id,
                    ok: Some(value),
                    error: None,
                    errors: Vec::new(),
                },
                attachments,
            ));
        }
        Action::Batch(items) => {
            let (value, errors, attachments) = batch_result(items, &command);
            let _ = events.send(Event::Send(
                Message::Result {
                    id,
                    ok: Some(value),
                    error: None,
                    errors,
                },
                attachments,
            ));
        }
        Action::Error { kind, message } => {
            let traceback = format!(
                "Traceback (most recent call last):\n  File \"fake_app.py\", in {command}\n{kind}: {message}"
            );
            send(Message::Result {
                id,
                ok: None,
                error: Some(RemoteError {
                    kind,
                    message,
                    traceback: Some(traceback),
                }),
                errors: Vec::new(),
            });
        }
        Action::Stream(items) => {
            for (seq, value) in items.into_iter().enumerate() {
                if reply.flow_control {
                    take_credit(&credits).await;
                }
                let sent = send(Message::Chunk {
                    id,
                    seq: seq as u64,
                    value,
                });
                if !sent {
                    return;
                }
            }
            send(Message::End { id });
        }
        Action::Endless => {
            for seq in 0u64.. {
                if reply.flow_control {
                    take_credit(&credits).await;
                } else if seq % 64 == 0 {
                    // A flood, but one that lets the worker's other tasks run.
                    tokio::task::yield_now().await;
                }
                let sent = send(Message::Chunk {
                    id,
                    seq,
                    value: Value::from(seq),
                });
                if !sent {
                    return;
                }
            }
        }
        Action::Crash(code) => {
            let _ = events.send(Event::Exit(code));
            return;
        }
        Action::Killed(signal) => {
            let _ = events.send(Event::Killed(signal));
            return;
        }
        Action::Hang => std::future::pending::<()>().await,
        Action::Garbage => {
            let _ = events.send(Event::Raw(Bytes::from_static(b"\xffgarbage")));
            // The pool drops a worker that sends garbage; this one lives on until killed.
            return;
        }
    }
    let _ = events.send(Event::Done(id));
}

/// The script's reply to each item of a batch call, as one reply: the items' latencies add up
/// (the worker runs them one after another); an item that ends the worker (a crash, a hang,
/// garbage) ends the batch there.
fn batch_reply(
    script: &(dyn Fn(&FakeCall) -> FakeReply + Send + Sync),
    call: &FakeCall,
) -> FakeReply {
    let items = call.args.as_array().cloned().unwrap_or_default();
    let mut latency = Duration::ZERO;
    let mut cancellable = true;
    let mut actions = Vec::with_capacity(items.len());
    for args in items {
        let (args, attachments) = localize(args, &call.attachments);
        let reply = script(&FakeCall {
            args,
            attachments,
            ..call.clone()
        });
        latency += reply.latency;
        cancellable &= reply.cancellable;
        match reply.action {
            action @ (Action::Ok(..) | Action::Error { .. } | Action::Stream(_)) => {
                actions.push(action)
            }
            Action::Endless | Action::Batch(_) => actions.push(Action::Error {
                kind: "TypeError".into(),
                message: "a batch item cannot be an endless stream".into(),
            }),
            ending => {
                return FakeReply {
                    action: ending,
                    latency,
                    cancellable: cancellable && reply.cancellable,
                    flow_control: true,
                }
            }
        }
    }
    FakeReply {
        action: Action::Batch(actions),
        latency,
        cancellable,
        flow_control: true,
    }
}

/// A batch reply's list of values, its failed items and its attachments (each item's
/// placeholders renumbered into the batch's list).
fn batch_result(items: Vec<Action>, command: &str) -> (Value, Vec<ItemError>, Vec<Bytes>) {
    let mut values = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    let mut attachments = Vec::new();
    for (index, action) in items.into_iter().enumerate() {
        match action {
            Action::Ok(mut value, own) => {
                shift_placeholders(&mut value, attachments.len());
                attachments.extend(own);
                values.push(value);
            }
            Action::Stream(items) => values.push(Value::Array(items)),
            Action::Error { kind, message } => {
                values.push(Value::Null);
                errors.push(ItemError {
                    index: index as u64,
                    error: RemoteError {
                        traceback: Some(format!(
                            "Traceback (most recent call last):\n  File \"fake_app.py\", in {command}\n{kind}: {message}"
                        )),
                        kind,
                        message,
                    },
                });
            }
            _ => values.push(Value::Null),
        }
    }
    (Value::Array(values), errors, attachments)
}

/// One batch item's arguments with attachments of its own: the frame's attachments it refers
/// to, its placeholders renumbered from 0.
fn localize(mut args: Value, all: &[Bytes]) -> (Value, Vec<Bytes>) {
    fn walk(value: &mut Value, all: &[Bytes], own: &mut Vec<Bytes>) {
        if let Some(index) = pool_core::placeholder_index(value) {
            if let Some(bytes) = all.get(index) {
                own.push(bytes.clone());
                *value = serde_json::json!({ protocol::ATTACHMENT_KEY: own.len() - 1 });
            }
            return;
        }
        match value {
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, all, own)),
            Value::Object(map) => map.values_mut().for_each(|v| walk(v, all, own)),
            _ => {}
        }
    }
    let mut own = Vec::new();
    walk(&mut args, all, &mut own);
    (args, own)
}

fn shift_placeholders(value: &mut Value, offset: usize) {
    if offset == 0 {
        return;
    }
    if let Some(index) = pool_core::placeholder_index(value) {
        *value = serde_json::json!({ protocol::ATTACHMENT_KEY: index + offset });
        return;
    }
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| shift_placeholders(v, offset)),
        Value::Object(map) => map.values_mut().for_each(|v| shift_placeholders(v, offset)),
        _ => {}
    }
}

/// Waits for the pool's credit to send one more stream item.
async fn take_credit(credits: &Semaphore) {
    match credits.acquire().await {
        Ok(permit) => permit.forget(),
        // Never closed: the worker's main loop holds the semaphore as long as the call runs.
        Err(_) => std::future::pending().await,
    }
}

/// The fakes as a conformance [`Target`](crate::conformance::Target), so the suite itself is
/// tested without Python. Process-level parts of the cases are skipped.
pub struct FakeTarget {
    launcher: Arc<FakeLauncher>,
}

impl FakeTarget {
    /// A target whose workers follow the standard script.
    pub fn new() -> Self {
        FakeTarget {
            launcher: FakeLauncher::builder().max_in_flight(4).build(),
        }
    }
}

impl Default for FakeTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::conformance::Target for FakeTarget {
    fn launcher(&self) -> Arc<dyn Launcher> {
        self.launcher.clone()
    }
    fn app(&self) -> String {
        "conformance_app".into()
    }
    fn broken_app(&self) -> String {
        "broken_import_app".into()
    }
    fn process_exists(&self, pid: u32) -> bool {
        self.launcher.is_alive(pid)
    }
    fn real_processes(&self) -> bool {
        false
    }
}
