//! What fake workers do: per-launch start behaviour and per-command replies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
}

/// What a fake worker does with a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Reply with a value.
    Ok(Value),
    /// Reply with a Python-style error.
    Error {
        /// Exception type.
        kind: String,
        /// Message.
        message: String,
    },
    /// Stream these items, then END.
    Stream(Vec<Value>),
    /// Exit the process with this code, without replying.
    Crash(i32),
    /// Freeze the whole worker: no reply, and no CANCEL, PING or SHUTDOWN handled any more (a
    /// handler stuck in C code holding the GIL). Only a signal ends it.
    Hang,
    /// Send a frame that is not protocol, which makes the pool drop the worker.
    Garbage,
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
}

impl FakeReply {
    fn of(action: Action) -> Self {
        FakeReply {
            action,
            latency: Duration::ZERO,
            cancellable: true,
        }
    }
    /// Reply with `value`.
    pub fn ok(value: Value) -> Self {
        Self::of(Action::Ok(value))
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
    /// The worker sends garbage instead of HELLO.
    Garbage,
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
        };
        script.add_standard_commands();
        script
    }
}

impl Script {
    /// The commands every fake worker knows unless overridden, mirroring the conformance app:
    /// `echo`, `add`, `fail`, `sleep` (seconds), `stream` (n), `pid`, `exit` (code), `remember` /
    /// `recall` (per-session state is not modelled: `recall` returns what `remember` got last on
    /// the same worker).
    fn add_standard_commands(&mut self) {
        self.on("echo", |call| {
            FakeReply::ok(
                call.args
                    .get("value")
                    .cloned()
                    .unwrap_or_else(|| call.args.clone()),
            )
        });
        self.on("add", |call| {
            let a = call.args["a"].as_f64().unwrap_or(0.0);
            let b = call.args["b"].as_f64().unwrap_or(0.0);
            FakeReply::ok(json!(a + b))
        });
        self.on("fail", |call| {
            FakeReply::error(
                "ValueError",
                call.args["message"].as_str().unwrap_or("failed"),
            )
        });
        self.on("sleep", |call| {
            let seconds = call.args["seconds"].as_f64().unwrap_or(0.0);
            FakeReply::ok(json!(seconds)).after(Duration::from_secs_f64(seconds.max(0.0)))
        });
        self.on("stream", |call| {
            let n = call.args["n"].as_u64().unwrap_or(0);
            FakeReply::stream((0..n).map(|i| json!(i)).collect())
        });
        self.on("pid", |call| FakeReply::ok(json!(1000 + call.worker)));
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
