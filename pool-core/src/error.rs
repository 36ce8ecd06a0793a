//! The one error type of the pool, with the context a caller needs to act on it, and the
//! taxonomy ([`ErrorKind`]) a program branches on without reading text.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::launcher::{write_stderr_tail, ExitInfo};
use crate::protocol::RemoteError;

/// Where a failed call came from: the pool, the command and the session (if any).
///
/// Shared strings keep [`Error`] small (a `Result<T, Error>` stays cheap to move) and make the
/// context cheap to build for every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    /// The pool's name.
    pub pool: Arc<str>,
    /// The command that was called.
    pub command: Arc<str>,
    /// The session the call belonged to.
    pub session: Option<Arc<str>>,
}

impl fmt::Display for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pool '{}', command '{}'", self.pool, self.command)?;
        if let Some(session) = &self.session {
            write!(f, ", session '{session}'")?;
        }
        Ok(())
    }
}

/// Which time limit expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// `checkout_timeout`: no worker became free in time.
    Checkout,
    /// `call_timeout`: the worker did not answer in time.
    Call,
    /// The per-call deadline, which was tighter than the configured timeouts.
    Deadline,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::Checkout => "checkout_timeout",
            TimeoutKind::Call => "call_timeout",
            TimeoutKind::Deadline => "call deadline",
        })
    }
}

/// Why a worker went away while it held a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerExit {
    /// The worker's id in the pool.
    pub worker: String,
    /// What the pool saw: the process exited, a protocol error, a kill by the pool…
    pub reason: String,
    /// The exit status, when the process was the pool's and has been reaped.
    pub exit: Option<ExitInfo>,
    /// The last lines the worker wrote to stderr.
    pub stderr_tail: Vec<String>,
}

impl WorkerExit {
    /// The exit code, when the process exited normally.
    pub fn code(&self) -> Option<i32> {
        self.exit.and_then(|exit| exit.code)
    }

    /// The signal that ended the process, on Unix.
    pub fn signal(&self) -> Option<i32> {
        self.exit.and_then(|exit| exit.signal)
    }
}

impl fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} {}", self.worker, self.reason)?;
        if let Some(exit) = &self.exit {
            write!(f, " ({exit})")?;
        }
        write_stderr_tail(f, &self.stderr_tail)
    }
}

/// What kind of failure an [`Error`] is: what a program branches on (retry, which HTTP status,
/// whose fault) without reading messages.
///
/// | kind | variants | whose fault | retry? | HTTP |
/// |---|---|---|---|---|
/// | `Overloaded` | `Saturated`, `WorkerBusy` | load | yes, with backoff | 503 + `Retry-After` |
/// | `Timeout` | `Timeout` | load or a slow handler | checkout: yes; call/deadline: maybe | 504 |
/// | `WorkerFailed` | `WorkerCrashed`, `Protocol` | the worker process | yes (it was replaced) | 502 |
/// | `Handler` | `Handler` | the Python code | no | 500 (or map the exception type) |
/// | `InvalidRequest` | `RequestTooLarge`, `ReplyTooLarge`, `InvalidArguments`, `UnknownCommand`, `Codec` | the caller | no | 400 / 413 / 422 |
/// | `Session` | `SessionEnded`, `SessionWorkerLost`, `TooManySessions` | session state | start the session over | 409 / 410 |
/// | `Unavailable` | `CircuitOpen`, `StartFailed` | environment (the app cannot start) | after the cooldown | 503 |
/// | `ShuttingDown` | `ShuttingDown` | the pool is closing | not on this pool | 503 |
/// | `Config` | `InvalidConfig` | the program | no | — |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The pool has no room for the call now: too many callers, or the session's worker is busy
    /// and the session asked not to wait.
    Overloaded,
    /// A time limit expired.
    Timeout,
    /// The worker process died or broke the protocol while holding the call.
    WorkerFailed,
    /// The handler raised an exception; the worker lives on.
    Handler,
    /// The call itself cannot work: too large, malformed arguments, an unknown command.
    InvalidRequest,
    /// The session cannot serve the call: ended, lost its worker, or too many sessions.
    Session,
    /// The pool cannot get workers running: the circuit breaker is open or start-up failed.
    Unavailable,
    /// The pool is shutting down.
    ShuttingDown,
    /// The configuration cannot work.
    Config,
}

/// Everything that can go wrong in a pool. Each variant says what happened and where; use
/// [`Error::kind`] to branch and [`Error::is_transient`] to decide on a retry.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The wait queue is full (`max_waiters`); the call was refused at once.
    #[error("{context}: pool saturated, {waiters} callers already waiting (max_waiters)")]
    Saturated {
        /// Where.
        context: CallContext,
        /// How many callers were waiting.
        waiters: usize,
    },
    /// The session's worker is busy and its affinity is
    /// [`StrictNoWait`](crate::Affinity::StrictNoWait): the call was refused at once.
    #[error("{context}: the session's worker {worker} is busy (strict affinity, no waiting)")]
    WorkerBusy {
        /// Where.
        context: CallContext,
        /// The session's worker.
        worker: String,
    },
    /// A time limit expired.
    #[error("{context}: {kind} expired after {}{}", humanize(*waited), worker.as_ref().map(|w| format!(" on worker {w}")).unwrap_or_default())]
    Timeout {
        /// Where.
        context: CallContext,
        /// Which limit expired.
        kind: TimeoutKind,
        /// How long the phase that expired took: the queue wait for `Checkout`, the execution for
        /// `Call`, the whole call for `Deadline`.
        waited: Duration,
        /// The worker that held the call, for call timeouts.
        worker: Option<String>,
    },
    /// The handler raised an exception; the worker lives on.
    #[error("{context}: handler raised {error} (worker {worker})")]
    Handler {
        /// Where.
        context: CallContext,
        /// The worker that ran the call.
        worker: String,
        /// The exception, with its traceback.
        error: Box<RemoteError>,
    },
    /// The worker died or was killed while holding the call.
    #[error("{context}: {exit}")]
    WorkerCrashed {
        /// Where.
        context: CallContext,
        /// What happened to the worker.
        exit: Box<WorkerExit>,
    },
    /// The worker answered with something the protocol does not allow here.
    #[error("{context}: protocol error from worker {worker}: {message}")]
    Protocol {
        /// Where.
        context: CallContext,
        /// The worker.
        worker: String,
        /// What was wrong.
        message: String,
    },
    /// The call's frame would exceed `max_frame`; it was refused before it was queued and no
    /// worker was touched.
    #[error("{context}: the request needs {size} bytes, more than max_frame ({max} bytes); send large data in fewer calls or raise max_frame")]
    RequestTooLarge {
        /// Where.
        context: CallContext,
        /// The size the request needs (at least).
        size: usize,
        /// `max_frame`.
        max: usize,
    },
    /// A streaming handler's items, collected by [`call`](crate::Pool::call), exceeded
    /// `max_reply_bytes`; the call was cancelled (the worker lives on). Use
    /// [`call_stream`](crate::Pool::call_stream) to take the items one by one.
    #[error("{context}: the reply exceeded max_reply_bytes ({max} bytes) after {items} items; the call was cancelled (use call_stream for large streams)")]
    ReplyTooLarge {
        /// Where.
        context: CallContext,
        /// Items received before the cap.
        items: u64,
        /// `max_reply_bytes`.
        max: usize,
    },
    /// The arguments cannot be sent as they are (an attachment placeholder with no attachment,
    /// values nested too deep…); nothing was sent.
    #[error("{context}: invalid arguments: {reason}")]
    InvalidArguments {
        /// Where.
        context: CallContext,
        /// What is wrong with them.
        reason: String,
    },
    /// No worker serves this command.
    #[error("{context}: unknown command{}; known commands: {}", suggestion.as_ref().map(|s| format!(" (did you mean '{s}'?)")).unwrap_or_default(), known.join(", "))]
    UnknownCommand {
        /// Where.
        context: CallContext,
        /// The commands the workers announced.
        known: Vec<String>,
        /// The closest known command, when one is close.
        suggestion: Option<String>,
    },
    /// Converting a value to or from the wire form failed (a `serde` error in
    /// [`Payload::from_serialize`](crate::Payload::from_serialize),
    /// [`Payload::deserialize`](crate::Payload::deserialize) or a typed call).
    #[error("codec error: {0}")]
    Codec(Arc<serde_json::Error>),
    /// A session with `Strict` affinity lost the worker that held its state.
    #[error("{context}: the session lost its worker {worker} (strict affinity): end it and start again, or use Session::restart")]
    SessionWorkerLost {
        /// Where.
        context: CallContext,
        /// The worker that is gone.
        worker: String,
    },
    /// The session was ended with [`Session::end`](crate::Session::end).
    #[error("{context}: the session has ended")]
    SessionEnded {
        /// Where.
        context: CallContext,
    },
    /// `max_sessions` sessions are open; a new one was refused.
    #[error(
        "{context}: {max} sessions are open (max_sessions); end one, or wait for one to expire"
    )]
    TooManySessions {
        /// Where.
        context: CallContext,
        /// `max_sessions`.
        max: usize,
    },
    /// Launching workers keeps failing; calls that have no live worker fail fast until a retry
    /// succeeds.
    #[error("{context}: circuit breaker open after {failures} failed launches; last error: {last_error}")]
    CircuitOpen {
        /// Where.
        context: CallContext,
        /// Consecutive failures that opened the breaker.
        failures: u32,
        /// The last launch or handshake error, or how the last worker died soon after start.
        last_error: String,
    },
    /// `Pool::start` could not get `min_ready` workers ready.
    #[error("pool '{pool}': start-up failed with {ready} of {wanted} workers ready: {reason}")]
    StartFailed {
        /// The pool.
        pool: String,
        /// Workers that were ready.
        ready: usize,
        /// `min_ready`.
        wanted: usize,
        /// Why: the last launch error (with stderr) or the timeout.
        reason: String,
    },
    /// The pool is shutting down or has shut down.
    #[error("{context}: the pool is shutting down")]
    ShuttingDown {
        /// Where.
        context: CallContext,
    },
    /// The configuration cannot work.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// What kind of failure this is; see [`ErrorKind`] for the mapping and what to do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Saturated { .. } | Error::WorkerBusy { .. } => ErrorKind::Overloaded,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::WorkerCrashed { .. } | Error::Protocol { .. } => ErrorKind::WorkerFailed,
            Error::Handler { .. } => ErrorKind::Handler,
            Error::RequestTooLarge { .. }
            | Error::ReplyTooLarge { .. }
            | Error::InvalidArguments { .. }
            | Error::UnknownCommand { .. }
            | Error::Codec(_) => ErrorKind::InvalidRequest,
            Error::SessionWorkerLost { .. }
            | Error::SessionEnded { .. }
            | Error::TooManySessions { .. } => ErrorKind::Session,
            Error::CircuitOpen { .. } | Error::StartFailed { .. } => ErrorKind::Unavailable,
            Error::ShuttingDown { .. } => ErrorKind::ShuttingDown,
            Error::InvalidConfig(_) => ErrorKind::Config,
        }
    }

    /// Whether the same call, retried later on the same pool, can succeed: overload, a checkout
    /// or call timeout, a crashed worker (the pool replaces it), an open breaker (after its
    /// cooldown). Never for the caller's own mistakes, handler exceptions, session errors or a
    /// pool that is shutting down.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Overloaded | ErrorKind::Timeout | ErrorKind::WorkerFailed
        ) || matches!(self, Error::CircuitOpen { .. })
    }

    /// The call's context (pool, command, session), for errors that belong to a call.
    pub fn context(&self) -> Option<&CallContext> {
        match self {
            Error::Saturated { context, .. }
            | Error::WorkerBusy { context, .. }
            | Error::Timeout { context, .. }
            | Error::Handler { context, .. }
            | Error::WorkerCrashed { context, .. }
            | Error::Protocol { context, .. }
            | Error::RequestTooLarge { context, .. }
            | Error::ReplyTooLarge { context, .. }
            | Error::InvalidArguments { context, .. }
            | Error::UnknownCommand { context, .. }
            | Error::SessionWorkerLost { context, .. }
            | Error::SessionEnded { context }
            | Error::TooManySessions { context, .. }
            | Error::CircuitOpen { context, .. }
            | Error::ShuttingDown { context } => Some(context),
            Error::Codec(_) | Error::StartFailed { .. } | Error::InvalidConfig(_) => None,
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::Codec(Arc::new(err))
    }
}

/// The known command closest to `command` (by edit distance), when it is close enough to be a
/// likely typo.
pub(crate) fn closest(command: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .map(|candidate| (edit_distance(command, candidate), candidate))
        .filter(|(distance, candidate)| {
            *distance <= (candidate.len().max(command.len()) / 3).max(1)
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.clone())
}

/// Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`: the optimal
/// string alignment distance, so a swapped pair of letters is one typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// What [`PoolConfig::require_commands`](crate::PoolConfig::require_commands) asks for that the
/// workers do not serve (`known`, sorted), as a sentence; `None` when nothing is missing.
pub(crate) fn missing_commands(required: &[String], known: &[String]) -> Option<String> {
    let missing: Vec<String> = required
        .iter()
        .filter(|command| known.binary_search(command).is_err())
        .map(|command| match closest(command, known) {
            Some(suggestion) => format!("'{command}' (did you mean '{suggestion}'?)"),
            None => format!("'{command}'"),
        })
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "the app does not serve the required command{} {}; it serves: {}",
        if missing.len() == 1 { "" } else { "s" },
        missing.join(", "),
        if known.is_empty() {
            "nothing".to_owned()
        } else {
            known.join(", ")
        }
    ))
}

/// A duration as people read it: `1.5s`, `250ms`, `3m 20s`.
pub(crate) fn humanize(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let secs = duration.as_secs();
    if secs < 60 {
        let tenths = (millis % 1000) / 100;
        return if tenths == 0 {
            format!("{secs}s")
        } else {
            format!("{secs}.{tenths}s")
        };
    }
    let (minutes, secs) = (secs / 60, secs % 60);
    if minutes < 60 {
        return format!("{minutes}m {secs}s");
    }
    format!("{}h {}m", minutes / 60, minutes % 60)
}

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_with_this_error_stay_small() {
        // clippy's result_large_err fires at 128 bytes in users' code returning our Result.
        assert!(
            std::mem::size_of::<Error>() < 128,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(humanize(Duration::from_micros(1500)), "1ms");
        assert_eq!(humanize(Duration::from_millis(250)), "250ms");
        assert_eq!(humanize(Duration::from_millis(1001)), "1s");
        assert_eq!(humanize(Duration::from_millis(1520)), "1.5s");
        assert_eq!(humanize(Duration::from_secs(200)), "3m 20s");
        assert_eq!(humanize(Duration::from_secs(7320)), "2h 2m");
    }

    #[test]
    fn a_typo_gets_a_suggestion_and_a_stranger_none() {
        let known: Vec<String> = ["predict", "recall", "remember"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(closest("predcit", &known).as_deref(), Some("predict"));
        assert_eq!(closest("recal", &known).as_deref(), Some("recall"));
        assert_eq!(closest("train_model", &known), None);
        assert_eq!(edit_distance("ecoh", "echo"), 1);
    }

    #[test]
    fn missing_commands_are_named_with_a_suggestion() {
        let known: Vec<String> = ["predict", "recall", "remember"]
            .into_iter()
            .map(String::from)
            .collect();
        let required = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(missing_commands(&required(&["predict"]), &known), None);
        assert_eq!(
            missing_commands(&required(&["predcit", "recall", "train"]), &known).as_deref(),
            Some("the app does not serve the required commands 'predcit' (did you mean 'predict'?), 'train'; it serves: predict, recall, remember")
        );
    }

    #[test]
    fn only_retryable_errors_are_transient() {
        let context = CallContext {
            pool: Arc::from("p"),
            command: Arc::from("c"),
            session: None,
        };
        let shutting_down = Error::ShuttingDown {
            context: context.clone(),
        };
        assert_eq!(shutting_down.kind(), ErrorKind::ShuttingDown);
        assert!(!shutting_down.is_transient());
        let saturated = Error::Saturated {
            context: context.clone(),
            waiters: 3,
        };
        assert!(saturated.is_transient());
        let too_large = Error::RequestTooLarge {
            context,
            size: 10,
            max: 5,
        };
        assert_eq!(too_large.kind(), ErrorKind::InvalidRequest);
        assert!(!too_large.is_transient());
    }
}
