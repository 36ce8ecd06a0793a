//! The one error type of the pool, with the context a caller needs to act on it.

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
    /// What the pool saw: end of stream, a protocol error, a kill by the pool…
    pub reason: String,
    /// The exit status, when the process was the pool's and has been reaped.
    pub exit: Option<ExitInfo>,
    /// The last lines the worker wrote to stderr.
    pub stderr_tail: Vec<String>,
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

/// Everything that can go wrong in a pool. Each variant says what happened and where.
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
    /// A time limit expired.
    #[error("{context}: {kind} expired after {waited:?}{}", worker.as_ref().map(|w| format!(" on worker {w}")).unwrap_or_default())]
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
    /// The worker died or misbehaved while holding the call.
    #[error("{context}: {exit}")]
    WorkerCrashed {
        /// Where.
        context: CallContext,
        /// What happened to the worker.
        exit: Box<WorkerExit>,
    },
    /// A session with `Strict` affinity lost the worker that held its state.
    #[error("pool '{pool}': session '{session}' lost its worker {worker} (strict affinity); end the session and start again")]
    SessionWorkerLost {
        /// The pool.
        pool: String,
        /// The session.
        session: String,
        /// The worker that is gone.
        worker: String,
    },
    /// Launching workers keeps failing; calls fail fast until a retry succeeds.
    #[error("pool '{pool}': circuit breaker open after {failures} failed launches; last error: {last_error}")]
    CircuitOpen {
        /// The pool.
        pool: String,
        /// Consecutive failures that opened the breaker.
        failures: u32,
        /// The last launch or handshake error.
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
    #[error("pool '{pool}' is shutting down")]
    ShuttingDown {
        /// The pool.
        pool: String,
    },
    /// The session was ended with [`Session::end`](crate::Session::end) or expired.
    #[error("pool '{pool}': session '{session}' has ended")]
    SessionEnded {
        /// The pool.
        pool: String,
        /// The session.
        session: String,
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
    /// The configuration cannot work.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Whether retrying the same call later may succeed (saturation, timeouts, crashes, an open
    /// breaker) as opposed to errors that will repeat (handler exceptions, bad configuration).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Saturated { .. }
                | Error::Timeout { .. }
                | Error::WorkerCrashed { .. }
                | Error::CircuitOpen { .. }
        )
    }
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
}
