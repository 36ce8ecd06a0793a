//! What fake workers do: per-launch start behaviour and per-command replies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

/// One call as a fake worker sees it, passed to command scripts.
#[derive(Debug, Clone)]
pub struct FakeCall {
    /// The worker's launch number in its launcher (0 for the first worker launched).
    pub worker: u64,
    /// How many calls this worker received before this one.
    pub nth: u64,
    /// The command.
    pub command: String,
    /// The arguments (attachment placeholders unresolved).
    pub args: Value,
    /// The session, if any.
    pub session: Option<String>,
    /// The call's binary attachments.
    pub attachments: Vec<Bytes>,
}

/// What a fake worker does with a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Reply with a value and attachments its placeholders refer to.
    Ok(Value, Vec<Bytes>),
    /// Reply with a Python-style error.
    Error {
        /// Exception type.
        kind: String,
        /// Message.
        message: String,
    },
    /// Stream these items, then END.
    Stream(Vec<Value>),
    /// Stream items (`0`, `1`, …) forever, like a generator that never ends.
    Endless,
    /// Exit the process with this code, without replying.
    Crash(i32),
    /// Die from this signal, without replying.
    Killed(i32),
    /// Freeze the whole worker: no reply, and no CANCEL, PING or SHUTDOWN handled any more (a
    /// handler stuck in C code holding the GIL). Only a signal ends it.
    Hang,
    /// Send a frame that is not protocol, which makes the pool drop the worker.
    Garbage,
    /// The reply to a batch call (a chunk of a map): one action per item, each `Ok`, `Error` or
    /// `Stream` (collected into a list). The fake builds it from the script's reply to each item.
    Batch(Vec<Action>),
}

/// A scripted reply: an action after some latency.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeReply {
    /// What to do.
    pub action: Action,
    /// How long to "work" first (on tokio time).
    pub latency: Duration,
    /// Whether CANCEL stops the work (answering CANCELLED). Default: yes.
    pub cancellable: bool,
    /// Whether a stream waits for the pool's CREDIT (flow control), as a conforming worker
    /// does. Default: yes; `false` floods the pool with items.
    pub flow_control: bool,
}

impl FakeReply {
    fn of(action: Action) -> Self {
        FakeReply {
            action,
            latency: Duration::ZERO,
            cancellable: true,
            flow_control: true,
        }
    }
    /// Reply with `value`.
    pub fn ok(value: Value) -> Self {
        Self::of(Action::Ok(value, Vec::new()))
    }
    /// Reply with `value` and the attachments its placeholders refer to.
    pub fn ok_with(value: Value, attachments: Vec<Bytes>) -> Self {
        Self::of(Action::Ok(value, attachments))
    }
    /// Die from `signal`.
    pub fn killed(signal: i32) -> Self {
        Self::of(Action::Killed(signal))
    }
    /// Raise `kind: message`.
    pub fn error(kind: &str, message: &str) -> Self {
        Self::of(Action::Error {
            kind: kind.into(),
            message: message.into(),
        })
    }
    /// Stream `items`.
    pub fn stream(items: Vec<Value>) -> Self {
        Self::of(Action::Stream(items))
    }
    /// Stream items forever (until cancelled).
    pub fn endless_stream() -> Self {
        Self::of(Action::Endless)
    }
    /// Send stream items without waiting for the pool's CREDIT: a worker that breaks flow
    /// control.
    pub fn ignoring_flow_control(mut self) -> Self {
        self.flow_control = false;
        self
    }
    /// Exit with `code`.
    pub fn crash(code: i32) -> Self {
        Self::of(Action::Crash(code))
    }
    /// Never answer, not even CANCEL.
    pub fn hang() -> Self {
        FakeReply {
            cancellable: false,
            ..Self::of(Action::Hang)
        }
    }
    /// Send a garbage frame.
    pub fn garbage() -> Self {
        Self::of(Action::Garbage)
    }
    /// Wait `latency` before acting.
    pub fn after(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
    /// Keep working through CANCEL (reply normally after the latency).
    pub fn ignoring_cancel(mut self) -> Self {
        self.cancellable = false;
        self
    }
}

/// How a fake worker starts.
#[derive(Debug, Clone, PartialEq)]
pub enum StartBehavior {
    /// Launch, wait `delay`, say HELLO.
    Ok {
        /// Time before HELLO.
        delay: Duration,
    },
    /// The launch itself fails (interpreter missing, spawn error).
    FailLaunch(String),
    /// The worker says STARTUP_ERROR (the app failed to import) and exits with code 2.
    StartupError(String),
    /// The worker exits with code 1 before HELLO, after writing a line to stderr.
    ExitBeforeHello(String),
    /// The worker never says HELLO.
    Hang,
    /// The worker sends garbage instead of HELLO and exits with code 3.
    Garbage,
    /// The worker sends garbage instead of HELLO and then lives on (until killed).
    GarbageThenHang,
    /// The worker completes its handshake and exits with this code at once, writing a line to
    /// stderr first: a worker that dies soon after every start.
    CrashAfterHello(i32),
}

impl StartBehavior {
    /// Starts after `delay`.
    pub fn after(delay: Duration) -> Self {
        StartBehavior::Ok { delay }
    }
}

pub(crate) type CommandScript = Arc<dyn Fn(&FakeCall) -> FakeReply + Send + Sync>;
pub(crate) type StartScript = Arc<dyn Fn(u64) -> StartBehavior + Send + Sync>;

/// The script every worker of a [`FakeLauncher`](crate::FakeLauncher) follows.
#[derive(Clone)]
pub struct Script {
    pub(crate) start: StartScript,
    pub(crate) commands: HashMap<String, CommandScript>,
    pub(crate) max_in_flight: u64,
    pub(crate) answer_pings: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    pub(crate) msgpack: bool,
    /// Launches return no process handle, like a worker that joined from another machine.
    pub(crate) remote: bool,
}

impl Default for Script {
    fn default() -> Self {
        let mut script = Script {
            start: Arc::new(|_| StartBehavior::Ok {
                delay: Duration::ZERO,
            }),
            commands: HashMap::new(),
            max_in_flight: 1,
            answer_pings: Arc::new(|_| true),
            msgpack: true,
            remote: false,
        };
        script.add_standard_commands();
        script
    }
}

impl Script {
    /// The commands every fake worker knows unless overridden, mirroring the conformance app:
    /// `echo`, `noisy`, `add`, `fail`, `sleep` (seconds, not cancellable), `async_sleep`, `stream`
    /// (n), `half` (n; odd numbers fail), `spin` (seconds), `meet`, `pid`, `exit` (code),
    /// `stderr_then_exit`, `kill_self`; `remember` / `recall` keep per-session state in the
    /// worker.
    fn add_standard_commands(&mut self) {
        self.on("echo", |call| {
            let value = call
                .args
                .get("value")
                .cloned()
                .unwrap_or_else(|| call.args.clone());
            FakeReply::ok_with(value, call.attachments.clone())
        });
        self.on("noisy", |call| {
            FakeReply::ok_with(call.args["value"].clone(), call.attachments.clone())
        });
        self.on("async_sleep", |call| {
            let seconds = call.args["seconds"].as_f64().unwrap_or(0.0);
            FakeReply::ok(call.args["seconds"].clone())
                .after(Duration::from_secs_f64(seconds.max(0.0)))
        });
        self.on("kill_self", |_| FakeReply::killed(9));
        self.on("count", |_| FakeReply::endless_stream());
        self.on("add", |call| {
            match (call.args["a"].as_i64(), call.args["b"].as_i64()) {
                (Some(a), Some(b)) => FakeReply::ok(json!(a + b)),
                _ => {
                    let a = call.args["a"].as_f64().unwrap_or(0.0);
                    let b = call.args["b"].as_f64().unwrap_or(0.0);
                    FakeReply::ok(json!(a + b))
                }
            }
        });
        self.on("fail", |call| {
            FakeReply::error(
                "ValueError",
                call.args["message"].as_str().unwrap_or("failed"),
            )
        });
        // Like Python's time.sleep in a sync handler: CANCEL cannot interrupt it.
        self.on("sleep", |call| {
            let seconds = call.args["seconds"].as_f64().unwrap_or(0.0);
            FakeReply::ok(call.args["seconds"].clone())
                .after(Duration::from_secs_f64(seconds.max(0.0)))
                .ignoring_cancel()
        });
        self.on("stream", |call| {
            let n = call.args["n"].as_u64().unwrap_or(0);
            FakeReply::stream((0..n).map(|i| json!(i)).collect())
        });
        self.on("half", |call| {
            let n = call.args["n"].as_u64().unwrap_or(0);
            if n % 2 == 1 {
                FakeReply::error("ValueError", &format!("{n} is odd"))
            } else {
                FakeReply::ok(json!(n / 2))
            }
        });
        self.on("spin", |call| {
            let seconds = call.args["seconds"].as_f64().unwrap_or(0.0);
            FakeReply::ok(call.args["seconds"].clone())
                .after(Duration::from_secs_f64(seconds.max(0.0)))
        });
        // The most calls seen running at once in the worker: a fake runs a batch's items one
        // after another, but reports what the conformance app's async `meet` does.
        self.on("meet", |_| FakeReply::ok(json!(4)));
        self.on("pid", |call| FakeReply::ok(json!(1000 + call.worker)));
        self.on("stderr_then_exit", |call| {
            FakeReply::crash(call.args["code"].as_i64().unwrap_or(1) as i32)
        });
        self.on("exit", |call| {
            FakeReply::crash(call.args["code"].as_i64().unwrap_or(1) as i32)
        });
    }

    /// Scripts `command`.
    pub fn on(
        &mut self,
        command: &str,
        f: impl Fn(&FakeCall) -> FakeReply + Send + Sync + 'static,
    ) {
        self.commands.insert(command.to_owned(), Arc::new(f));
    }
}
