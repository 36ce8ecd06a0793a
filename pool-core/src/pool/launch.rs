//! Launching workers: concurrent start, background replacement with backoff, the circuit
//! breaker, and what happens when a worker exits.

use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::state::{Phase, Slot, State};
use super::{deliver, Shared};
use crate::error::{Error, WorkerExit};
use crate::launcher::WorkerSpec;
use crate::stats::{BreakerState, Metrics};
use crate::worker::{HandshakeError, WorkerConn};

impl Shared {
    /// Starts a task that launches one worker (retrying with backoff for permanent workers).
    pub(crate) fn spawn_launch(self: &Arc<Self>, state: &mut State, overflow: bool) {
        if overflow {
            state.starting_overflow += 1;
        } else {
            state.starting_permanent += 1;
        }
        let shared = self.clone();
        self.tasks
            .spawn(async move { shared.launch_loop(overflow).await });
    }

    async fn launch_loop(self: Arc<Self>, overflow: bool) {
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stopping.cancelled() => break,
                }
            }
            if !self.breaker_gate().await {
                break;
            }
            let (seq, spec) = {
                let mut state = self.state.lock();
                let seq = state.next_worker;
                state.next_worker += 1;
                (seq, self.spec(seq))
            };
            let attempt = self.launch_one(&spec);
            let result = tokio::select! {
                result = attempt => result,
                _ = self.stopping.cancelled() => break,
            };
            match result {
                Ok((conn, receiver)) => {
                    self.install(seq, conn, receiver, overflow);
                    return;
                }
                Err(err) => {
                    delay = self.launch_failed(&spec, err);
                    if overflow {
                        break;
                    }
                }
            }
        }
        let mut state = self.state.lock();
        if overflow {
            state.starting_overflow -= 1;
        } else {
            state.starting_permanent -= 1;
        }
        drop(state);
        self.changed.notify_waiters();
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
        let launched = self
            .launcher
            .launch(spec)
            .await
            .map_err(|error| HandshakeError {
                error,
                fatal: false,
            })?;
        let timeout = self
            .launcher
            .handshake_timeout()
            .unwrap_or(self.config.handshake_timeout);
        WorkerConn::handshake(
            launched,
            &spec.pool,
            &spec.worker_id,
            spec.max_frame,
            timeout,
            self.metrics.late_replies.clone(),
        )
        .await
    }

    /// Waits until the breaker lets a launch through. `false` when the pool is stopping.
    async fn breaker_gate(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut state = self.state.lock();
                if state.phase != Phase::Running {
                    return false;
                }
                let breaker = &mut state.breaker;
                match breaker.state {
                    BreakerState::Closed => return true,
                    BreakerState::Open if Instant::now() >= breaker.open_until => {
                        // This launch is the trial; the others wait for its outcome.
                        breaker.state = BreakerState::HalfOpen;
                        return true;
                    }
                    BreakerState::Open => Some(breaker.open_until),
                    BreakerState::HalfOpen => None,
                }
            };
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wait_until.unwrap_or(far)) => {}
                _ = self.stopping.cancelled() => return false,
            }
        }
    }

    /// Records a failed launch and returns how long to wait before the next attempt.
    fn launch_failed(&self, spec: &WorkerSpec, err: HandshakeError) -> Duration {
        let message = err.error.to_string();
        tracing::warn!(pool = %self.config.name, worker = %spec.worker_id, "worker launch failed: {message}");
        Metrics::inc(&self.metrics.launch_failures);
        let mut state = self.state.lock();
        if err.fatal {
            state.fatal_start_error = Some(message.clone());
        }
        let breaker = &mut state.breaker;
        breaker.failures += 1;
        breaker.last_error = Some(message);
        let now = Instant::now();
        let opened = match breaker.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => breaker.failures >= self.config.breaker_threshold,
            BreakerState::Open => false,
        };
        if opened {
            breaker.state = BreakerState::Open;
            breaker.open_until = now + self.config.breaker_cooldown;
            tracing::error!(pool = %self.config.name, failures = breaker.failures, "circuit breaker open");
        }
        let failures = breaker.failures;
        // Callers with no worker to wait for fail fast with the launch error.
        let failed_waiters = if state.breaker_open() && state.live_workers() == 0 {
            std::mem::take(&mut state.waiters)
        } else {
            Default::default()
        };
        let error = self.circuit_error(&state);
        drop(state);
        for waiter in failed_waiters {
            Metrics::inc(&self.metrics.circuit_rejections);
            let _ = waiter.tx.send(Err(error.clone()));
        }
        self.changed.notify_waiters();
        let exponent = failures.saturating_sub(1).min(16);
        self.config
            .restart_backoff
            .saturating_mul(1 << exponent)
            .min(self.config.restart_backoff_max)
    }

    /// Adds a worker that finished its handshake and serves waiting callers with it.
    fn install(
        self: &Arc<Self>,
        seq: u64,
        conn: Arc<WorkerConn>,
        receiver: Box<dyn crate::launcher::FrameReceiver>,
        overflow: bool,
    ) {
        let mut state = self.state.lock();
        if overflow {
            state.starting_overflow -= 1;
        } else {
            state.starting_permanent -= 1;
        }
        if state.phase != Phase::Running {
            drop(state);
            // Dropping the connection kills the process.
            drop(conn);
            self.changed.notify_waiters();
            return;
        }
        Metrics::inc(&self.metrics.launches);
        state.breaker.state = BreakerState::Closed;
        state.breaker.failures = 0;
        let capacity = (conn.hello.max_in_flight as usize)
            .min(self.config.max_in_flight.unwrap_or(usize::MAX));
        let recycle_after = self.config.max_calls.map(|max| {
            let jitter = self.config.max_calls_jitter.unwrap_or(max / 10);
            max + rand::thread_rng().gen_range(0..=jitter)
        });
        let now = Instant::now();
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
        state.workers.insert(
            seq,
            Slot {
                conn,
                overflow,
                in_flight: 0,
                capacity,
                retiring: false,
                killed: None,
                settling: 0,
                calls: 0,
                recycle_after,
                started: now,
                last_used: now,
                last_ping: now,
                pinging: false,
                missed_pings: 0,
            },
        );
        let deliveries = state.dispatch(|seq, conn| self.lease(seq, conn));
        drop(state);
        deliver(deliveries);
        self.changed.notify_waiters();
    }

    /// A worker's channel ended: forget it, fail callers pinned to it, start a replacement.
    pub(crate) fn on_worker_exit(self: &Arc<Self>, seq: u64, exit: WorkerExit) {
        let mut state = self.state.lock();
        let Some(slot) = state.workers.remove(&seq) else {
            return;
        };
        match &slot.killed {
            Some(_) => tracing::info!(pool = %self.config.name, "{exit}"),
            None => {
                Metrics::inc(&self.metrics.crashes);
                tracing::warn!(pool = %self.config.name, "worker crashed: {exit}");
            }
        }
        let lost = state.take_waiters_pinned_to(seq);
        if !slot.overflow && state.phase == Phase::Running {
            self.spawn_launch(&mut state, false);
        }
        drop(state);
        for (waiter, session) in lost {
            let _ = waiter.tx.send(Err(Error::SessionWorkerLost {
                pool: self.config.name.clone(),
                session: session.to_string(),
                worker: exit.worker.clone(),
            }));
        }
        drop(slot);
        self.changed.notify_waiters();
    }

    /// Stops a worker that finished its last call, then replaces it if it was permanent.
    /// The caller removed the slot from the pool and counted it in `stopping`, under the same lock.
    pub(crate) fn retire(self: &Arc<Self>, slot: Slot) {
        let shared = self.clone();
        self.tasks.spawn(async move {
            slot.conn.stop(shared.config.stop_grace).await;
            let mut state = shared.state.lock();
            state.stopping -= 1;
            if !slot.overflow && state.phase == Phase::Running {
                shared.spawn_launch(&mut state, false);
            }
        });
    }
}
