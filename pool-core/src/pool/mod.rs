//! The pool: fair checkout of worker slots, calls with time limits, and the public API.

mod launch;
mod lease;
mod maintenance;
mod state;

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use lease::CallStream;

use crate::config::{Affinity, PoolConfig};
use crate::error::{CallContext, Error, TimeoutKind};
use crate::launcher::Launcher;
use crate::payload::Payload;
use crate::session::Session;
use crate::stats::{
    Gauges, Metrics, PoolStats, PoolStatus, SessionStatus, WorkerState, WorkerStatus,
};
use lease::{InFlight, Lease};
use state::{Delivery, Phase, SessionEntry, State, Target, Waiter};

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

/// How a call ended, for statistics.
pub(crate) enum Outcome<'a> {
    Ok,
    Failed(&'a Error),
    /// The caller went away before the reply.
    Abandoned,
}

/// The state shared by a pool's handles and its background tasks.
pub(crate) struct Shared {
    pub(crate) config: PoolConfig,
    /// `config.name`, shared by every call's error context.
    pub(crate) name: Arc<str>,
    pub(crate) launcher: Arc<dyn Launcher>,
    pub(crate) state: Mutex<State>,
    pub(crate) metrics: Metrics,
    /// Woken whenever workers, slots or the breaker change.
    pub(crate) changed: Notify,
    /// Cancelled at shutdown or drop: stops launches and maintenance.
    pub(crate) stopping: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// Kills every worker when the last [`Pool`] handle goes away without a shutdown.
struct DropGuard {
    shared: Arc<Shared>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.shared.stopping.cancel();
        let mut state = self.shared.state.lock();
        state.phase = Phase::Closing;
        state.waiters.clear();
        for slot in state.workers.values() {
            slot.conn.kill();
        }
    }
}

/// A pool of Python workers. Cheap to clone; all clones share the pool.
///
/// A pool starts `size` workers concurrently and counts each ready only after its handshake.
/// Callers are served first come, first served; each call is bounded by `checkout_timeout` (waiting
/// for a worker), `call_timeout` (running) and an optional per-call deadline. Crashed, hung and
/// worn-out workers are replaced in the background. A late reply is never delivered to another
/// caller. [`shutdown`](Pool::shutdown) stops everything gracefully; dropping the last handle kills
/// every worker at once.
///
/// # Example
///
/// ```
/// # async fn demo(launcher: std::sync::Arc<dyn pool_core::Launcher>) -> pool_core::Result<()> {
/// use std::time::Duration;
/// use pool_core::{Pool, PoolConfig};
/// use serde_json::json;
///
/// let pool = Pool::start(PoolConfig::new("handlers.py").size(4), launcher).await?;
/// let reply = pool.call("predict", json!({"x": [1, 2, 3]})).await?;
/// println!("{}", reply.value);
/// pool.shutdown(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.config.name)
            .finish()
    }
}

impl Pool {
    /// Starts a pool and waits until `min_ready` workers have completed their handshake.
    ///
    /// All workers launch at once. Fails with [`Error::StartFailed`] (with the last launch error
    /// and the worker's stderr) when a worker reports it cannot start (for instance its app fails to
    /// import), when launches keep failing until the circuit breaker opens, or after
    /// `start_timeout`. It never hangs, and a failed start leaves no process behind.
    pub async fn start(config: PoolConfig, launcher: Arc<dyn Launcher>) -> Result<Pool, Error> {
        config.validate()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(Instant::now())),
            metrics: Metrics::new(),
            changed: Notify::new(),
            stopping: CancellationToken::new(),
            tasks: TaskTracker::new(),
            name: Arc::from(config.name.as_str()),
            config,
            launcher,
        });
        let pool = Pool {
            _guard: Arc::new(DropGuard {
                shared: shared.clone(),
            }),
            shared,
        };
        {
            let mut state = pool.shared.state.lock();
            for _ in 0..pool.shared.config.size {
                pool.shared.spawn_launch(&mut state, false);
            }
        }
        pool.shared
            .tasks
            .spawn(maintenance::run(pool.shared.clone()));
        match pool.wait_ready().await {
            Ok(()) => Ok(pool),
            Err(err) => {
                pool.shutdown(Duration::ZERO).await;
                Err(err)
            }
        }
    }

    async fn wait_ready(&self) -> Result<(), Error> {
        let shared = &self.shared;
        let wanted = shared.config.effective_min_ready();
        let deadline = Instant::now() + shared.config.start_timeout;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reason = {
                let state = shared.state.lock();
                let ready = state.live_workers();
                if ready >= wanted {
                    return Ok(());
                }
                let reason = if let Some(fatal) = &state.fatal_start_error {
                    Some(fatal.clone())
                } else if state.breaker_open() {
                    Some(format!(
                        "{} launches failed in a row; last error: {}",
                        state.breaker.failures,
                        state.breaker.last_error.as_deref().unwrap_or("unknown")
                    ))
                } else if Instant::now() >= deadline {
                    Some(format!(
                        "start_timeout of {:?} expired; last launch error: {}",
                        shared.config.start_timeout,
                        state.breaker.last_error.as_deref().unwrap_or("none")
                    ))
                } else {
                    None
                };
                reason.map(|reason| (reason, ready))
            };
            if let Some((reason, ready)) = reason {
                return Err(Error::StartFailed {
                    pool: shared.config.name.clone(),
                    ready,
                    wanted,
                    reason,
                });
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Calls `command` on any free worker and waits for its result.
    ///
    /// A streaming handler's chunks are collected into a list. Errors say which limit expired,
    /// what the handler raised, or how the worker died.
    pub async fn call(&self, command: &str, args: impl Into<Payload>) -> Result<Payload, Error> {
        self.shared
            .call(None, command, args.into(), CallOptions::default())
            .await
    }

    /// [`call`](Pool::call) with per-call options (a deadline).
    pub async fn call_with(
        &self,
        command: &str,
        args: impl Into<Payload>,
        options: CallOptions,
    ) -> Result<Payload, Error> {
        self.shared.call(None, command, args.into(), options).await
    }

    /// Calls a streaming handler and returns its items as they arrive.
    pub async fn call_stream(
        &self,
        command: &str,
        args: impl Into<Payload>,
    ) -> Result<CallStream, Error> {
        self.shared
            .call_stream(None, command, args.into(), CallOptions::default())
            .await
    }

    /// [`call_stream`](Pool::call_stream) with per-call options.
    pub async fn call_stream_with(
        &self,
        command: &str,
        args: impl Into<Payload>,
        options: CallOptions,
    ) -> Result<CallStream, Error> {
        self.shared
            .call_stream(None, command, args.into(), options)
            .await
    }

    /// A handle on session `id` with the pool's default affinity. The session is registered on
    /// its first call.
    pub fn session(&self, id: impl Into<String>) -> Session {
        self.session_with(id, self.shared.config.default_affinity)
    }

    /// A handle on session `id` with the given affinity. The affinity is fixed when the session is
    /// first registered; later handles use the registered one.
    pub fn session_with(&self, id: impl Into<String>, affinity: Affinity) -> Session {
        Session::new(self.clone(), Arc::from(id.into()), affinity)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Counters, gauges and latency histograms.
    pub fn stats(&self) -> PoolStats {
        let gauges = self.shared.state.lock().gauges();
        PoolStats {
            pool: self.shared.config.name.clone(),
            counters: self.shared.metrics.counters(),
            gauges,
            queue_wait: self.shared.metrics.queue_wait(),
            call_time: self.shared.metrics.call_time(),
        }
    }

    /// What every worker and session is doing now.
    pub fn status(&self) -> PoolStatus {
        let now = Instant::now();
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        let state = self.shared.state.lock();
        let worker_name = |seq: u64| state.workers.get(&seq).map(|s| s.conn.id.clone());
        let workers = state
            .workers
            .values()
            .map(|slot| WorkerStatus {
                id: slot.conn.id.clone(),
                pid: slot.conn.pid(),
                state: if slot.retiring {
                    WorkerState::Draining
                } else if slot.in_flight >= slot.capacity {
                    WorkerState::Busy
                } else {
                    WorkerState::Ready
                },
                overflow: slot.overflow,
                in_flight: slot.in_flight,
                max_in_flight: slot.capacity,
                calls: slot.calls,
                age_ms: ms(now - slot.started),
                idle_ms: if slot.in_flight == 0 {
                    ms(now - slot.last_used)
                } else {
                    0
                },
                rss_bytes: slot.conn.rss_bytes(),
                missed_pings: slot.missed_pings,
                python: slot.conn.hello.python.clone(),
            })
            .collect();
        let mut sessions: Vec<SessionStatus> = state
            .sessions
            .iter()
            .map(|(id, entry)| SessionStatus {
                id: id.to_string(),
                affinity: entry.affinity,
                age_ms: ms(now - entry.created),
                idle_ms: ms(now - entry.last_used),
                calls: entry.calls,
                errors: entry.errors,
                last_worker: entry.last_worker.and_then(worker_name),
            })
            .collect();
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        PoolStatus {
            pool: self.shared.config.name.clone(),
            transport: self.shared.launcher.name().to_owned(),
            shutting_down: state.phase != Phase::Running,
            breaker: state.breaker.state,
            launch_failures_in_a_row: state.breaker.failures,
            last_launch_error: state.breaker.last_error.clone(),
            workers,
            gauges: state.gauges(),
            sessions,
        }
    }

    /// Shuts the pool down gracefully.
    ///
    /// Stops admitting calls and fails waiting callers with [`Error::ShuttingDown`]; lets calls in
    /// flight finish for up to `grace`; then sends SHUTDOWN to every worker, SIGTERM and SIGKILL to
    /// those that do not exit within `stop_grace` each, reaps every process and releases the
    /// transport's resources. Calling it again, or from several handles, is harmless.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = &self.shared;
        let waiters: Vec<Waiter> = {
            let mut state = shared.state.lock();
            state.phase = Phase::Closing;
            state.waiters.drain(..).collect()
        };
        for waiter in waiters {
            let _ = waiter.tx.send(Err(Error::ShuttingDown {
                pool: shared.config.name.clone(),
            }));
        }
        shared.stopping.cancel();
        shared.changed.notify_waiters();
        let deadline = Instant::now() + grace;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let busy = shared
                .state
                .lock()
                .workers
                .values()
                .any(|s| s.in_flight > 0);
            if !busy {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let slots: Vec<_> = {
            let mut state = shared.state.lock();
            std::mem::take(&mut state.workers).into_values().collect()
        };
        let stop_grace = shared.config.stop_grace;
        futures::future::join_all(slots.iter().map(|slot| slot.conn.stop(stop_grace))).await;
        drop(slots);
        shared.tasks.close();
        shared.tasks.wait().await;
        shared.launcher.shutdown().await;
        tracing::info!(pool = %shared.config.name, "pool shut down");
    }
}

impl State {
    fn gauges(&self) -> Gauges {
        let mut gauges = Gauges {
            workers_starting: self.starting(),
            waiters: self.waiters.len(),
            sessions: self.sessions.len(),
            ..Gauges::default()
        };
        for slot in self.workers.values() {
            gauges.calls_in_flight += slot.in_flight;
            if slot.retiring {
                gauges.workers_draining += 1;
            } else if slot.in_flight >= slot.capacity {
                gauges.workers_busy += 1;
            } else {
                gauges.workers_ready += 1;
            }
        }
        gauges
    }
}

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
    fn context(&self, session: Option<&Session>, command: &str) -> CallContext {
        CallContext {
            pool: self.name.clone(),
            command: Arc::from(command),
            session: session.map(|s| s.key().clone()),
        }
    }

    pub(crate) async fn call(
        self: &Arc<Self>,
        session: Option<&Session>,
        command: &str,
        args: Payload,
        options: CallOptions,
    ) -> Result<Payload, Error> {
        let context = self.context(session, command);
        let span = tracing::info_span!(
            "pypool.call",
            pool = %context.pool,
            command = %context.command,
            session = context.session.as_deref().unwrap_or(""),
            worker = tracing::field::Empty,
            call_id = tracing::field::Empty,
        );
        let session_id = session.map(|s| s.key().clone());
        async {
            let started = Instant::now();
            let (result, took) = match self.begin(session, &context, args, options).await {
                Err(err) => (Err(err), None),
                Ok((mut flight, deadline, kind)) => {
                    let result =
                        match tokio::time::timeout_at(deadline, flight.collect(&context)).await {
                            Ok(result) => result,
                            Err(_) => Err(Error::Timeout {
                                context: context.clone(),
                                kind,
                                waited: flight.waited(kind, started),
                                worker: Some(flight.worker_id().to_owned()),
                            }),
                        };
                    (result, Some(flight.sent_at().elapsed()))
                }
            };
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(err) => Outcome::Failed(err),
            };
            self.call_finished(session_id.as_deref(), took, outcome);
            result
        }
        .instrument(span)
        .await
    }

    pub(crate) async fn call_stream(
        self: &Arc<Self>,
        session: Option<&Session>,
        command: &str,
        args: Payload,
        options: CallOptions,
    ) -> Result<CallStream, Error> {
        let context = self.context(session, command);
        let started = Instant::now();
        match self.begin(session, &context, args, options).await {
            Ok((flight, deadline, kind)) => Ok(CallStream {
                flight: Some(flight),
                context,
                timer: Box::pin(tokio::time::sleep_until(deadline)),
                timeout_kind: kind,
                started,
                shared: self.clone(),
                session: session.map(|s| s.key().clone()),
            }),
            Err(err) => {
                self.call_finished(session.map(|s| &**s.key()), None, Outcome::Failed(&err));
                Err(err)
            }
        }
    }

    /// Checks out a slot and sends the call. Returns the flight and when its execution must end.
    async fn begin(
        self: &Arc<Self>,
        session: Option<&Session>,
        context: &CallContext,
        args: Payload,
        options: CallOptions,
    ) -> Result<(InFlight, Instant, TimeoutKind), Error> {
        let target = match session {
            Some(session) => self.session_target(session)?,
            None => Target::Any,
        };
        let lease = self.checkout(context, target, options.deadline).await?;
        let span = tracing::Span::current();
        span.record("worker", lease.conn.id.as_str());
        let (deadline, kind) = limit(
            self.config.call_timeout,
            options.deadline,
            TimeoutKind::Call,
        );
        let timeout = deadline.saturating_duration_since(Instant::now());
        let conn = lease.conn.clone();
        match conn
            .send_call(
                &context.command,
                args,
                context.session.as_deref(),
                Some(timeout),
            )
            .await
        {
            Ok((id, replies)) => {
                span.record("call_id", id);
                Ok((InFlight::new(lease, id, replies), deadline, kind))
            }
            Err(exit) => Err(Error::WorkerCrashed {
                context: context.clone(),
                exit: Box::new(exit),
            }),
        }
    }

    /// Registers the session's call and says which workers may serve it.
    fn session_target(&self, session: &Session) -> Result<Target, Error> {
        if session.is_ended() {
            return Err(Error::SessionEnded {
                pool: self.config.name.clone(),
                session: session.id().to_owned(),
            });
        }
        let mut state = self.state.lock();
        let now = Instant::now();
        let affinity = {
            let entry = state
                .sessions
                .entry(session.key().clone())
                .or_insert_with(|| SessionEntry::new(session.requested_affinity(), now));
            entry.in_flight += 1;
            entry.last_used = now;
            (entry.affinity, entry.bound)
        };
        if let (Affinity::Strict, Some(bound)) = affinity {
            if state.workers.get(&bound).is_none_or(|s| s.retiring) {
                let worker = state
                    .workers
                    .get(&bound)
                    .map(|s| s.conn.id.clone())
                    .unwrap_or_else(|| format!("w{bound}"));
                if let Some(entry) = state.sessions.get_mut(session.key()) {
                    entry.in_flight -= 1;
                }
                return Err(Error::SessionWorkerLost {
                    pool: self.config.name.clone(),
                    session: session.id().to_owned(),
                    worker,
                });
            }
        }
        Ok(Target::Session {
            id: session.key().clone(),
            affinity: affinity.0,
        })
    }

    /// Waits in the FIFO queue for a free slot that suits `target`.
    async fn checkout(
        self: &Arc<Self>,
        context: &CallContext,
        target: Target,
        deadline: Option<Instant>,
    ) -> Result<Lease, Error> {
        let started = Instant::now();
        let (until, kind) = limit(
            self.config.checkout_timeout,
            deadline,
            TimeoutKind::Checkout,
        );
        let (waiter_id, rx) = {
            let mut state = self.state.lock();
            if state.phase != Phase::Running {
                return Err(Error::ShuttingDown {
                    pool: self.config.name.clone(),
                });
            }
            if state.waiters.is_empty() {
                if let Some(seq) = state.pick(&target) {
                    if let Some(conn) = state.take(seq, &target) {
                        drop(state);
                        self.metrics.record_queue_wait(started.elapsed());
                        return Ok(self.lease(seq, conn));
                    }
                }
            }
            if state.breaker_open() && state.live_workers() == 0 {
                Metrics::inc(&self.metrics.circuit_rejections);
                return Err(self.circuit_error(&state));
            }
            if state.waiters.len() >= self.config.max_waiters {
                Metrics::inc(&self.metrics.saturated);
                return Err(Error::Saturated {
                    context: context.clone(),
                    waiters: state.waiters.len(),
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter += 1;
            state.waiters.push_back(Waiter { id, target, tx });
            let deliveries = state.dispatch(|seq, conn| self.lease(seq, conn));
            self.grow(&mut state);
            drop(state);
            deliver(deliveries);
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
                Err(_) => Err(Error::ShuttingDown { pool: self.config.name.clone() }),
            },
            _ = tokio::time::sleep_until(until) => {
                guard.leave();
                // A lease may have been handed over just as time ran out: take it.
                match rx.try_recv() {
                    Ok(result) => result,
                    Err(_) => {
                        Metrics::inc(&self.metrics.checkout_timeouts);
                        Err(Error::Timeout {
                            context: context.clone(),
                            kind,
                            waited: started.elapsed(),
                            worker: None,
                        })
                    }
                }
            }
        };
        guard.id = None;
        if result.is_ok() {
            self.metrics.record_queue_wait(started.elapsed());
        }
        result
    }

    fn circuit_error(&self, state: &State) -> Error {
        Error::CircuitOpen {
            pool: self.config.name.clone(),
            failures: state.breaker.failures,
            last_error: state.breaker.last_error.clone().unwrap_or_default(),
        }
    }

    fn lease(self: &Arc<Self>, seq: u64, conn: Arc<crate::worker::WorkerConn>) -> Lease {
        Lease {
            shared: self.clone(),
            seq,
            conn,
        }
    }

    /// Starts overflow workers while callers wait for more workers than are starting.
    fn grow(self: &Arc<Self>, state: &mut State) {
        let max_total = self.config.size + self.config.max_overflow;
        while state.phase == Phase::Running
            && !state.breaker_open()
            && state.waiters.len() > state.starting()
            && state.workers.len() + state.starting() + state.stopping < max_total
        {
            self.spawn_launch(state, true);
        }
    }

    /// Returns a slot; recycles the worker if it is due; serves the next waiter.
    pub(crate) fn release(self: &Arc<Self>, seq: u64) {
        let (deliveries, retired) = {
            let mut state = self.state.lock();
            let mut retired = None;
            if let Some(slot) = state.workers.get_mut(&seq) {
                slot.in_flight = slot.in_flight.saturating_sub(1);
                slot.last_used = Instant::now();
                if !slot.retiring {
                    if let Some(reason) = self.recycle_reason(slot) {
                        tracing::info!(pool = %self.config.name, worker = %slot.conn.id, "recycling worker: {reason}");
                        Metrics::inc(&self.metrics.recycled);
                        slot.retiring = true;
                    }
                }
                if slot.retiring && slot.in_flight == 0 && slot.killed.is_none() {
                    retired = state.workers.remove(&seq);
                    state.stopping += 1;
                }
            }
            let deliveries = state.dispatch(|seq, conn| self.lease(seq, conn));
            (deliveries, retired)
        };
        deliver(deliveries);
        if let Some(slot) = retired {
            self.retire(slot);
        }
        self.changed.notify_waiters();
    }

    fn recycle_reason(&self, slot: &state::Slot) -> Option<String> {
        if let Some(limit) = slot.recycle_after {
            if slot.calls >= limit {
                return Some(format!("served {} calls (max_calls)", slot.calls));
            }
        }
        if let Some(max_age) = self.config.max_age {
            if slot.started.elapsed() >= max_age {
                return Some(format!("older than max_age {max_age:?}"));
            }
        }
        if let Some(max_rss) = self.config.max_rss {
            if let Some(rss) = slot.conn.rss_bytes() {
                if rss > max_rss {
                    return Some(format!(
                        "resident memory {rss} bytes exceeds max_rss {max_rss}"
                    ));
                }
            }
        }
        None
    }

    /// Marks a cancelled call on worker `seq` as unconfirmed (`true`) or settled (`false`).
    pub(crate) fn set_settling(&self, seq: u64, settling: bool) {
        let mut state = self.state.lock();
        if let Some(slot) = state.workers.get_mut(&seq) {
            if settling {
                slot.settling += 1;
            } else {
                slot.settling = slot.settling.saturating_sub(1);
            }
        }
    }

    /// Kills a worker that cannot be trusted any more; the reader's exit report replaces it.
    pub(crate) fn kill_worker(&self, seq: u64, reason: &str) {
        let mut state = self.state.lock();
        if let Some(slot) = state.workers.get_mut(&seq) {
            if slot.killed.is_none() {
                tracing::warn!(pool = %self.config.name, worker = %slot.conn.id, "killing worker: {reason}");
                Metrics::inc(&self.metrics.killed);
                slot.retiring = true;
                slot.killed = Some(reason.to_owned());
                slot.conn.terminate_connection(reason);
            }
        }
    }

    /// Records a finished call in the statistics and its session. `took` is the execution time
    /// (from sending the call), when the call got that far.
    pub(crate) fn call_finished(
        &self,
        session: Option<&str>,
        took: Option<Duration>,
        outcome: Outcome<'_>,
    ) {
        // These errors come from `session_target`, before the call was registered in its session.
        let registered = !matches!(
            outcome,
            Outcome::Failed(Error::SessionEnded { .. } | Error::SessionWorkerLost { .. })
        );
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
        if let (Some(session), true) = (session, registered) {
            let mut state = self.state.lock();
            if let Some(entry) = state.sessions.get_mut(session) {
                entry.in_flight = entry.in_flight.saturating_sub(1);
                entry.calls += 1;
                entry.errors += u64::from(failed);
                entry.last_used = Instant::now();
            }
        }
    }

    /// Ends a session: forgets it and tells every worker that may hold its state.
    pub(crate) async fn end_session(&self, id: &str) {
        let conns: Vec<_> = {
            let mut state = self.state.lock();
            let Some(entry) = state.sessions.remove(id) else {
                return;
            };
            entry
                .touched
                .iter()
                .filter_map(|seq| state.workers.get(seq).map(|s| s.conn.clone()))
                .collect()
        };
        for conn in conns {
            conn.send_session_end(id).await;
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
            if let Some(pos) = state.waiters.iter().position(|w| w.id == id) {
                state.waiters.remove(pos);
            }
        }
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Hands leases to waiters. A waiter that has gone away drops its lease, which releases the slot
/// and serves the next waiter.
fn deliver(deliveries: Vec<Delivery>) {
    for (tx, lease) in deliveries {
        let _ = tx.send(Ok(lease));
    }
}
