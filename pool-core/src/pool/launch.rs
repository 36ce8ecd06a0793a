//! Launching workers (one attempt per task; the decisions start the next), the handshake, what
//! happens when a worker exits, retirement, and giving slots back.

use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::sessions::SessionEvent;
use super::state::{NewWorker, Slot};
use super::Shared;
use crate::error::WorkerExit;
use crate::launcher::WorkerSpec;
use crate::stats::Metrics;
use crate::worker::{HandshakeError, WorkerConn};

impl Shared {
    /// Launches one worker (the decisions counted it as starting). Success installs it; failure
    /// counts against the backoff and the breaker. Either way the decisions run again.
    pub(crate) async fn launch(self: Arc<Self>, overflow: bool) {
        let (seq, spec) = {
            let mut state = self.state.lock();
            let seq = state.next_worker_seq();
            (seq, self.spec(seq))
        };
        let attempt = self.launch_one(&spec);
        let result = tokio::select! {
            result = attempt => result,
            _ = self.stopping.cancelled() => {
                self.state.lock().launch_ended(overflow);
                self.changed.notify_waiters();
                return;
            }
        };
        match result {
            Ok((conn, receiver)) => self.install(seq, conn, receiver, overflow),
            Err(err) => {
                let message = err.error.to_string();
                tracing::warn!(pool = %self.config.name, worker = %spec.worker_id, "worker launch failed: {message}");
                Metrics::inc(&self.metrics.launch_failures);
                let now = Instant::now();
                let mut state = self.state.lock();
                state.launch_ended(overflow);
                state.launch_failed(message, err.fatal, now);
                if state.breaker_just_opened(now) {
                    tracing::error!(pool = %self.config.name, failures = state.breaker().failures, "circuit breaker open");
                }
                let decisions = state.decide(now);
                drop(state);
                self.apply(decisions);
            }
        }
    }

    fn spec(&self, seq: u64) -> WorkerSpec {
        let config = &self.config;
        WorkerSpec {
            pool: config.name.clone(),
            worker_id: format!("w{seq}"),
            app: config.app.clone(),
            python: config.python.clone(),
            env: config.env.clone(),
            cwd: config.cwd.clone(),
            max_frame: config.max_frame,
            stderr_tail_lines: config.stderr_tail_lines,
        }
    }

    async fn launch_one(
        &self,
        spec: &WorkerSpec,
    ) -> Result<(Arc<WorkerConn>, Box<dyn crate::launcher::FrameReceiver>), HandshakeError> {
        let launch_timeout = self
            .launcher
            .launch_timeout()
            .unwrap_or(self.config.launch_timeout);
        let launched = match tokio::time::timeout(launch_timeout, self.launcher.launch(spec)).await
        {
            Ok(Ok(launched)) => launched,
            Ok(Err(error)) => {
                return Err(HandshakeError {
                    error,
                    fatal: false,
                })
            }
            Err(_) => {
                return Err(HandshakeError {
                    error: crate::LaunchError::new(format!(
                        "launching worker {} took longer than launch_timeout ({})",
                        spec.worker_id,
                        crate::error::humanize(launch_timeout)
                    )),
                    fatal: false,
                })
            }
        };
        let handshake_timeout = self
            .launcher
            .handshake_timeout()
            .unwrap_or(self.config.handshake_timeout);
        WorkerConn::handshake(
            launched,
            &spec.worker_id,
            &self.conn_settings,
            handshake_timeout,
        )
        .await
    }

    /// Adds a worker that finished its handshake; the decisions hand it to waiting callers.
    fn install(
        self: &Arc<Self>,
        seq: u64,
        conn: Arc<WorkerConn>,
        receiver: Box<dyn crate::launcher::FrameReceiver>,
        overflow: bool,
    ) {
        let mut state = self.state.lock();
        if !state.is_running() {
            state.launch_ended(overflow);
            drop(state);
            // Dropping the connection kills the process.
            drop(conn);
            self.changed.notify_waiters();
            return;
        }
        Metrics::inc(&self.metrics.launches);
        let runs = (conn.hello.max_in_flight as usize)
            .min(self.config.max_in_flight.unwrap_or(usize::MAX));
        let recycle_after = self.config.max_calls.map(|max| {
            let jitter = self.config.max_calls_jitter.unwrap_or(max / 10);
            max + rand::thread_rng().gen_range(0..=jitter)
        });
        tracing::info!(
            pool = %self.config.name,
            worker = %conn.id,
            pid = conn.pid(),
            python = %conn.hello.python,
            overflow,
            "worker ready"
        );
        let weak: Weak<Shared> = Arc::downgrade(self);
        conn.start_reader(
            receiver,
            Box::new(move |exit| {
                if let Some(shared) = weak.upgrade() {
                    shared.on_worker_exit(seq, exit);
                }
            }),
        );
        let now = Instant::now();
        let max_age = self.drawn_max_age();
        state.install(
            seq,
            NewWorker {
                conn,
                overflow,
                runs,
                recycle_after,
                max_age,
            },
            now,
        );
        let decisions = state.decide(now);
        drop(state);
        self.apply(decisions);
    }

    /// The age at which a worker is recycled: `max_age` plus its jitter, drawn per worker.
    pub(crate) fn drawn_max_age(&self) -> Option<Duration> {
        self.config.max_age.map(|max| {
            let jitter = self.config.max_age_jitter.unwrap_or(max / 10);
            max + jitter.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
        })
    }

    /// A worker's reader saw it go: forget it, fail callers bound to it, and count a death soon
    /// after start as a failed launch (so a worker that always dies young cannot make the pool
    /// spawn in a tight loop).
    pub(crate) fn on_worker_exit(self: &Arc<Self>, seq: u64, exit: WorkerExit) {
        let now = Instant::now();
        let mut state = self.state.lock();
        let Some((slot, lost)) = state.remove_worker(seq) else {
            return;
        };
        let uptime = now.saturating_duration_since(slot.started);
        if slot.was_killed() {
            tracing::info!(pool = %self.config.name, "{exit}");
        } else {
            Metrics::inc(&self.metrics.crashes);
            tracing::warn!(pool = %self.config.name, "worker crashed: {exit}");
            if uptime < self.config.stable_uptime && state.is_running() {
                state.launch_failed(
                    format!(
                        "{exit} (after {} of {} needed to count as a stable start)",
                        crate::error::humanize(uptime),
                        crate::error::humanize(self.config.stable_uptime)
                    ),
                    false,
                    now,
                );
                if state.breaker_just_opened(now) {
                    tracing::error!(pool = %self.config.name, failures = state.breaker().failures, "circuit breaker open: workers keep dying soon after their start");
                }
            }
        }
        let decisions = state.decide(now);
        drop(state);
        for session in lost {
            self.emit(SessionEvent::WorkerLost {
                session: session.to_string(),
                worker: exit.worker.clone(),
            });
        }
        drop(slot);
        self.apply(decisions);
    }

    /// Stops a retired worker (the decisions removed it from the pool and counted it as
    /// stopping); the decisions then start its replacement if one is still needed.
    pub(crate) fn retire(self: &Arc<Self>, slot: Slot) {
        let shared = self.clone();
        tracing::info!(pool = %self.config.name, worker = %slot.conn.id, "retiring worker");
        self.spawn(async move {
            slot.conn.stop(shared.config.stop_grace).await;
            let mut state = shared.state.lock();
            state.stopped(slot.overflow);
            let decisions = state.decide(Instant::now());
            drop(state);
            shared.apply(decisions);
        });
    }

    /// Returns a slot; recycles the worker if it became due; serves the next waiter.
    pub(crate) fn release(self: &Arc<Self>, seq: u64, sent: Option<Instant>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        if let Some(reason) = state.release(seq, now, sent, self.config.max_rss) {
            Metrics::inc(&self.metrics.recycled);
            if let Some(name) = state.worker_name(seq) {
                tracing::info!(pool = %self.config.name, worker = %name, "recycling worker: {reason}");
            }
        }
        let decisions = state.decide(now);
        drop(state);
        self.apply(decisions);
    }

    /// Marks a cancelled call on worker `seq` as unconfirmed (`true`) or settled (`false`).
    pub(crate) fn set_settling(self: &Arc<Self>, seq: u64, settling: bool) {
        let mut state = self.state.lock();
        state.set_settling(seq, settling);
        if !settling {
            let decisions = state.decide(Instant::now());
            drop(state);
            self.apply(decisions);
        }
    }

    /// Kills a worker that cannot be trusted any more; the reader's exit report replaces it.
    pub(crate) fn kill_worker(self: &Arc<Self>, seq: u64, reason: &str) {
        let mut state = self.state.lock();
        if state.mark_killed(seq, reason) {
            if let Some(slot) = state.slot(seq) {
                tracing::warn!(pool = %self.config.name, worker = %slot.conn.id, "killing worker: {reason}");
                Metrics::inc(&self.metrics.killed);
                slot.conn.terminate_connection(reason);
            }
        }
        let decisions = state.decide(Instant::now());
        drop(state);
        self.apply(decisions);
    }
}
