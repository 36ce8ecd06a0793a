//! The call path: checking a request, waiting in the queue for a slot, sending the call, and the
//! public `call` methods.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use super::lease::{Answer, CallStream, InFlight, Lease};
use super::state::{Target, Waiter};
use super::{Outcome, Pool, Shared};
use crate::config::Affinity;
use crate::error::{closest, CallContext, Error, TimeoutKind};
use crate::payload::{Payload, PayloadProblem};
use crate::protocol::{CallShape, MAX_DEPTH};
use crate::stats::Metrics;
use crate::worker::SendError;

/// Per-call options: a deadline that caps both the wait for a worker and the execution.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use pool_core::CallOptions;
///
/// let options = CallOptions::new().timeout(Duration::from_millis(250));
/// assert!(options.deadline.is_some());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    /// The call fails with [`TimeoutKind::Deadline`] if it has not finished by then.
    pub deadline: Option<Instant>,
}

impl CallOptions {
    /// No deadline: only the pool's `checkout_timeout` and `call_timeout` apply.
    pub fn new() -> Self {
        CallOptions::default()
    }

    /// Sets an absolute deadline.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets a deadline `timeout` from now.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.deadline(Instant::now() + timeout)
    }
}

/// Who makes a call: the pool directly, or a session (its id and the affinity it asked for).
#[derive(Clone, Copy)]
pub(crate) struct Caller<'a> {
    pub session: Option<(&'a Arc<str>, Affinity)>,
    /// Set for a session handle that was ended: its calls fail.
    pub ended: Option<&'a std::sync::atomic::AtomicBool>,
}

impl Caller<'_> {
    pub(crate) const POOL: Caller<'static> = Caller {
        session: None,
        ended: None,
    };

    fn session_id(&self) -> Option<&Arc<str>> {
        self.session.map(|(id, _)| id)
    }
}

/// Bytes a CALL header needs beyond its arguments: field names, the id, the timeout, the window,
/// the command and the session, each at its largest.
const CALL_OVERHEAD: usize = 256;

/// The tighter of a configured timeout and the deadline, and which one it is.
fn limit(
    configured: Duration,
    deadline: Option<Instant>,
    kind: TimeoutKind,
) -> (Instant, TimeoutKind) {
    let configured_at = Instant::now() + configured;
    match deadline {
        Some(deadline) if deadline < configured_at => (deadline, TimeoutKind::Deadline),
        _ => (configured_at, kind),
    }
}

impl Shared {
    pub(crate) async fn call(
        self: &Arc<Self>,
        caller: Caller<'_>,
        command: &str,
        args: Payload,
        options: CallOptions,
    ) -> Result<Payload, Error> {
        self.exchange(caller, command, args, options, CallShape::One)
            .await
            .map(|answer| answer.value)
    }

    /// One call from checkout to its final reply. A batch call (`batch`: `args` is the list of
    /// the items' arguments) returns the list of results and the items that failed.
    pub(crate) async fn exchange(
        self: &Arc<Self>,
        caller: Caller<'_>,
        command: &str,
        args: Payload,
        options: CallOptions,
        shape: CallShape,
    ) -> Result<Answer, Error> {
        let context = self.context(caller.session_id(), command);
        // Debug level: a span per call costs more than the rest of the pool's work on a busy
        // pool, so it is there for whoever turns debug tracing on.
        let span = tracing::debug_span!(
            "pypool.call",
            pool = %context.pool,
            command = %context.command,
            session = context.session.as_deref().unwrap_or(""),
            worker = tracing::field::Empty,
            call_id = tracing::field::Empty,
        );
        let run = async {
            let started = Instant::now();
            let (result, took, registered) = match self
                .begin(caller, &context, args, options, started, shape)
                .await
            {
                Err((err, registered)) => (Err(err), None, registered),
                Ok((mut flight, deadline, kind)) => {
                    let result = match tokio::time::timeout_at(
                        deadline,
                        flight.collect(&context, self.config.max_reply_bytes, shape.is_batch()),
                    )
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => Err(Error::Timeout {
                            context: context.clone(),
                            kind,
                            waited: flight.waited(kind, started),
                            worker: Some(flight.worker_id().to_owned()),
                        }),
                    };
                    (result, Some(flight.sent_at().elapsed()), true)
                }
            };
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(err) => Outcome::Failed(err),
            };
            let session = registered.then(|| caller.session_id()).flatten();
            self.call_finished(session.map(|s| &**s), took, outcome);
            result
        };
        // An instrumented future enters and leaves its span on every poll, even a disabled one:
        // a cost on every call when nobody listens at debug level.
        if span.is_disabled() {
            run.await
        } else {
            run.instrument(span).await
        }
    }

    pub(crate) async fn call_stream(
        self: &Arc<Self>,
        caller: Caller<'_>,
        command: &str,
        args: Payload,
        options: CallOptions,
    ) -> Result<CallStream, Error> {
        let context = self.context(caller.session_id(), command);
        let started = Instant::now();
        match self
            .begin(caller, &context, args, options, started, CallShape::One)
            .await
        {
            Ok((flight, deadline, kind)) => Ok(CallStream::new(
                flight,
                context,
                deadline,
                kind,
                started,
                self.clone(),
                caller.session_id().cloned(),
            )),
            Err((err, registered)) => {
                let session = registered.then(|| caller.session_id()).flatten();
                self.call_finished(session.map(|s| &**s), None, Outcome::Failed(&err));
                Err(err)
            }
        }
    }

    /// Checks the request, checks out a slot and sends the call. Returns the flight and when its
    /// execution must end; on failure, the error and whether the call had been registered with
    /// its session (so that its end is counted there).
    async fn begin(
        self: &Arc<Self>,
        caller: Caller<'_>,
        context: &CallContext,
        args: Payload,
        options: CallOptions,
        started: Instant,
        shape: CallShape,
    ) -> Result<(InFlight, Instant, TimeoutKind), (Error, bool)> {
        // A batch's items were checked one by one as the map packed them (and the frame's
        // size is checked again when it is encoded).
        let checked = match shape {
            CallShape::Batch { .. } => self.check_command(context),
            CallShape::One => self.check_request(context, &args),
        };
        checked.map_err(|err| (err, false))?;
        let target = match caller.session {
            Some((id, affinity)) => self
                .session_target(id, affinity, caller.ended, context)
                .map_err(|err| (err, false))?,
            None => Target::Any,
        };
        let lease = self
            .checkout(context, target, options.deadline, started)
            .await
            .map_err(|err| (err, true))?;
        let (deadline, kind) = limit(
            self.config.call_timeout,
            options.deadline,
            TimeoutKind::Call,
        );
        let now = Instant::now();
        if deadline <= now {
            // The deadline passed while the slot was handed over: the call is never sent.
            let err = Error::Timeout {
                context: context.clone(),
                kind,
                waited: now.saturating_duration_since(started),
                worker: None,
            };
            return Err((err, true));
        }
        let span = tracing::Span::current();
        span.record("worker", lease.conn.id.as_str());
        match lease.conn.send_call(
            &context.command,
            args,
            context.session.as_deref(),
            Some(deadline - now),
            shape,
        ) {
            Ok((id, replies)) => {
                span.record("call_id", id);
                Ok((InFlight::new(lease, id, replies, now), deadline, kind))
            }
            Err(SendError::Dead(death)) => Err((self.death_error(context, death), true)),
            Err(SendError::TooLarge(size)) => Err((
                Error::RequestTooLarge {
                    context: context.clone(),
                    size,
                    max: self.config.max_frame,
                },
                true,
            )),
            Err(SendError::Encode(reason)) => Err((
                Error::InvalidArguments {
                    context: context.clone(),
                    reason,
                },
                true,
            )),
        }
    }

    /// Refuses, before anything is queued or sent, a call that cannot work: an unknown command,
    /// arguments that cannot be sent, a frame larger than `max_frame`.
    fn check_request(&self, context: &CallContext, args: &Payload) -> Result<(), Error> {
        self.check_command(context)?;
        self.check_args(context, args).map(|_| ())
    }

    /// Refuses calls when the pool is shutting down or the workers do not serve the command.
    pub(crate) fn check_command(&self, context: &CallContext) -> Result<(), Error> {
        let state = self.state.lock();
        if !state.is_running() {
            return Err(Error::ShuttingDown {
                context: context.clone(),
            });
        }
        let known = state.commands();
        if !known.is_empty()
            && known
                .binary_search_by(|c| c.as_str().cmp(&context.command))
                .is_err()
        {
            return Err(Error::UnknownCommand {
                context: context.clone(),
                known: known.to_vec(),
                suggestion: closest(&context.command, known),
            });
        }
        Ok(())
    }

    /// Bytes a CALL frame needs beyond its arguments.
    pub(crate) fn call_overhead(context: &CallContext) -> usize {
        CALL_OVERHEAD
            + context.command.len() * 6
            + context.session.as_deref().map_or(0, |s| s.len() * 6)
    }

    /// Checks that `args` can be sent in a call of its own and returns an upper bound of their
    /// encoded size (without the call's overhead).
    pub(crate) fn check_args(&self, context: &CallContext, args: &Payload) -> Result<usize, Error> {
        match args.check(MAX_DEPTH) {
            Ok(size) => {
                let framed = size.saturating_add(Self::call_overhead(context));
                if framed > self.config.max_frame {
                    return Err(Error::RequestTooLarge {
                        context: context.clone(),
                        size: framed,
                        max: self.config.max_frame,
                    });
                }
                Ok(size)
            }
            Err(PayloadProblem::Placeholder(index)) => Err(Error::InvalidArguments {
                context: context.clone(),
                reason: format!(
                    "{{\"{}\": {index}}} refers to attachment {index}, but the arguments have {} \
                     (the key is reserved for attachment placeholders: use Payload::attach)",
                    crate::protocol::ATTACHMENT_KEY,
                    args.attachments.len()
                ),
            }),
            Err(PayloadProblem::TooDeep) => Err(Error::InvalidArguments {
                context: context.clone(),
                reason: format!("values nest more than {MAX_DEPTH} levels deep"),
            }),
        }
    }

    /// Waits in the FIFO queue for a free slot that suits `target`.
    async fn checkout(
        self: &Arc<Self>,
        context: &CallContext,
        target: Target,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<Lease, Error> {
        let (until, kind) = limit(
            self.config.checkout_timeout,
            deadline,
            TimeoutKind::Checkout,
        );
        let (waiter_id, rx) = {
            let mut state = self.state.lock();
            if !state.is_running() {
                return Err(Error::ShuttingDown {
                    context: context.clone(),
                });
            }
            if let Some((seq, conn)) = state.take_now(&target) {
                drop(state);
                self.metrics.record_queue_wait(started.elapsed());
                return Ok(self.lease(seq, conn));
            }
            if let Some(error) = state.circuit_error(context) {
                Metrics::inc(&self.metrics.circuit_rejections);
                return Err(error);
            }
            if let Some(waiters) = state.queue_full() {
                Metrics::inc(&self.metrics.saturated);
                return Err(Error::Saturated {
                    context: context.clone(),
                    waiters,
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = state.enqueue(Waiter {
                id: 0,
                target,
                tx,
                context: context.clone(),
                until,
                kind,
                started,
            });
            let decisions = state.decide(Instant::now());
            drop(state);
            self.apply(decisions);
            (id, rx)
        };
        // Leaves the queue if this future is dropped or times out while waiting.
        let mut guard = WaiterGuard {
            shared: self,
            id: Some(waiter_id),
        };
        let mut rx = rx;
        let result = tokio::select! {
            received = &mut rx => match received {
                Ok(result) => result,
                Err(_) => Err(Error::ShuttingDown { context: context.clone() }),
            },
            _ = tokio::time::sleep_until(until) => {
                guard.leave();
                // A lease handed over just as time ran out goes back: the call's time is up.
                if let Ok(Ok(lease)) = rx.try_recv() {
                    drop(lease);
                }
                Metrics::inc(&self.metrics.checkout_timeouts);
                Err(Error::Timeout {
                    context: context.clone(),
                    kind,
                    waited: started.elapsed(),
                    worker: None,
                })
            }
        };
        guard.id = None;
        if result.is_ok() {
            self.metrics.record_queue_wait(started.elapsed());
        }
        result
    }

    pub(crate) fn lease(self: &Arc<Self>, seq: u64, conn: Arc<crate::worker::WorkerConn>) -> Lease {
        Lease::new(self.clone(), seq, conn)
    }

    /// Counts a waiter that failed in the queue (the decisions failed it).
    pub(crate) fn count_failed_wait(&self, error: &Error) {
        match error {
            Error::CircuitOpen { .. } => Metrics::inc(&self.metrics.circuit_rejections),
            Error::Timeout { .. } => Metrics::inc(&self.metrics.checkout_timeouts),
            _ => {}
        }
    }

    /// Records a finished call in the statistics and its session. `took` is the execution time
    /// (from sending the call), when the call got that far; `session` is set when the call was
    /// registered with its session.
    pub(crate) fn call_finished(
        &self,
        session: Option<&str>,
        took: Option<Duration>,
        outcome: Outcome<'_>,
    ) {
        let failed = match outcome {
            Outcome::Ok => {
                Metrics::inc(&self.metrics.calls_ok);
                if let Some(took) = took {
                    self.metrics.record_call_time(took);
                }
                false
            }
            Outcome::Failed(err) => {
                Metrics::inc(&self.metrics.calls_failed);
                match err {
                    Error::Handler { .. } => Metrics::inc(&self.metrics.handler_errors),
                    Error::Timeout {
                        worker: Some(_), ..
                    } => Metrics::inc(&self.metrics.call_timeouts),
                    _ => {}
                }
                true
            }
            Outcome::Abandoned => false,
        };
        if let Some(session) = session {
            self.state
                .lock()
                .session_call_done(session, failed, Instant::now());
        }
    }
}

/// Removes a waiter from the queue when its caller stops waiting.
struct WaiterGuard<'a> {
    shared: &'a Arc<Shared>,
    id: Option<u64>,
}

impl WaiterGuard<'_> {
    fn leave(&mut self) {
        if let Some(id) = self.id.take() {
            let mut state = self.shared.state.lock();
            if state.leave(id) {
                // Its place may have been what an overflow launch was for.
                let decisions = state.decide(Instant::now());
                drop(state);
                self.shared.apply(decisions);
            }
        }
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Pool {
    /// Calls `command` on any free worker and waits for its result.
    ///
    /// A streaming handler's items are collected into a list (up to `max_reply_bytes`). Errors
    /// say which limit expired, what the handler raised, or how the worker died.
    pub async fn call(&self, command: &str, args: impl Into<Payload>) -> Result<Payload, Error> {
        self.shared()
            .call(Caller::POOL, command, args.into(), CallOptions::default())
            .await
    }

    /// [`call`](Pool::call) with per-call options (a deadline).
    pub async fn call_with(
        &self,
        command: &str,
        args: impl Into<Payload>,
        options: CallOptions,
    ) -> Result<Payload, Error> {
        self.shared()
            .call(Caller::POOL, command, args.into(), options)
            .await
    }

    /// Calls `command` with any `serde` value as arguments and deserializes the result into `R`.
    ///
    /// # Example
    ///
    /// ```
    /// # async fn demo(pool: pool_core::Pool) -> pool_core::Result<()> {
    /// #[derive(serde::Serialize)]
    /// struct Features { features: Vec<f64> }
    ///
    /// let score: f64 = pool.call_as("predict", &Features { features: vec![1.0, 2.0] }).await?;
    /// # let _ = score; Ok(()) }
    /// ```
    pub async fn call_as<R: DeserializeOwned>(
        &self,
        command: &str,
        args: &(impl Serialize + ?Sized),
    ) -> Result<R, Error> {
        let args = Payload::from_serialize(args)?;
        let reply = self.call(command, args).await?;
        Ok(reply.deserialize()?)
    }

    /// Calls a streaming handler and returns its items as they arrive.
    pub async fn call_stream(
        &self,
        command: &str,
        args: impl Into<Payload>,
    ) -> Result<CallStream, Error> {
        self.shared()
            .call_stream(Caller::POOL, command, args.into(), CallOptions::default())
            .await
    }

    /// [`call_stream`](Pool::call_stream) with per-call options.
    pub async fn call_stream_with(
        &self,
        command: &str,
        args: impl Into<Payload>,
        options: CallOptions,
    ) -> Result<CallStream, Error> {
        self.shared()
            .call_stream(Caller::POOL, command, args.into(), options)
            .await
    }

    /// The commands the workers serve (announced in their handshakes), sorted.
    pub fn commands(&self) -> Vec<String> {
        self.shared().state.lock().commands().to_vec()
    }
}
