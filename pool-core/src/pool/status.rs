//! What the pool reports about itself: statistics, the status of every worker and session, and
//! a health verdict.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Pool;
use crate::stats::{
    BreakerState, CallObserver, CallObserverId, Health, HealthState, PoolStats, PoolStatus,
    SessionStatus, WorkerState, WorkerStatus,
};

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Pool {
    /// Counters, gauges and latency histograms.
    pub fn stats(&self) -> PoolStats {
        let shared = self.shared();
        let gauges = shared.state.lock().gauges();
        PoolStats {
            pool: shared.config.name.clone(),
            counters: shared.metrics.counters(),
            gauges,
            queue_wait: shared.metrics.queue_wait(),
            call_time: shared.metrics.call_time(),
        }
    }

    /// Attaches `observer`: from now on it sees every call's measurements ([`CallEvent`]s) as
    /// the pool takes them, until [`remove_call_observer`](Pool::remove_call_observer) detaches
    /// it or the pool is dropped. A pool can have several observers; without any, a measurement
    /// costs one atomic load more than without this feature.
    ///
    /// [`CallEvent`]: crate::CallEvent
    pub fn add_call_observer(&self, observer: Arc<dyn CallObserver>) -> CallObserverId {
        self.shared().metrics.add_observer(observer)
    }

    /// Detaches the observer `id`. Returns whether it was attached.
    pub fn remove_call_observer(&self, id: CallObserverId) -> bool {
        self.shared().metrics.remove_observer(id)
    }

    /// What every worker and session is doing now. Workers are listed in the order they were
    /// started; sessions by id.
    pub fn status(&self) -> PoolStatus {
        let shared = self.shared();
        let now = Instant::now();
        let state = shared.state.lock();
        let workers = state
            .workers()
            .map(|(_, slot)| WorkerStatus {
                id: slot.conn.id.clone(),
                pid: slot.conn.pid(),
                state: if slot.is_draining() {
                    WorkerState::Draining
                } else if slot.is_due() {
                    WorkerState::Recycling
                } else if slot.in_flight() >= slot.capacity(now) {
                    WorkerState::Busy
                } else {
                    WorkerState::Ready
                },
                overflow: slot.overflow,
                in_flight: slot.in_flight(),
                max_in_flight: slot.capacity(now),
                calls: slot.calls(),
                age_ms: millis(now.saturating_duration_since(slot.started)),
                idle_ms: if slot.in_flight() == 0 {
                    millis(now.saturating_duration_since(slot.last_used()))
                } else {
                    0
                },
                rss_bytes: slot.rss,
                missed_pings: slot.missed_pings,
                python: slot.conn.hello.python.clone(),
                codec: slot.conn.codec.name().to_owned(),
            })
            .collect();
        let mut sessions: Vec<SessionStatus> = state
            .sessions()
            .map(|(id, entry)| SessionStatus {
                id: id.to_string(),
                affinity: entry.affinity,
                age_ms: millis(now.saturating_duration_since(entry.created)),
                idle_ms: millis(now.saturating_duration_since(entry.last_used)),
                calls: entry.calls,
                errors: entry.errors,
                last_worker: entry.last_worker.and_then(|seq| state.worker_name(seq)),
            })
            .collect();
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        let breaker = state.breaker();
        PoolStatus {
            pool: shared.config.name.clone(),
            transport: shared.launcher.name().to_owned(),
            shutting_down: !state.is_running(),
            uptime_ms: millis(now.saturating_duration_since(shared.started)),
            breaker: breaker.state,
            launch_failures_in_a_row: breaker.failures,
            last_launch_error: breaker.last_error.clone(),
            workers,
            gauges: state.gauges(),
            sessions,
        }
    }

    /// A health verdict for readiness and liveness probes: `Healthy` with `size` live workers and
    /// working launches, `Degraded` while calls are served by fewer or launches fail,
    /// `Unavailable` when no worker can take calls.
    pub fn health(&self) -> Health {
        let shared = self.shared();
        let state = shared.state.lock();
        let live = state.live_workers();
        let breaker = state.breaker();
        let wanted = shared.config.size;
        let failing = breaker.state != BreakerState::Closed || breaker.failures > 0;
        let verdict = if !state.is_running() || live == 0 {
            HealthState::Unavailable
        } else if live < wanted || failing {
            HealthState::Degraded
        } else {
            HealthState::Healthy
        };
        Health {
            state: verdict,
            live_workers: live,
            wanted_workers: wanted,
            starting_workers: state.starting(),
            breaker: breaker.state,
            last_launch_error: failing.then(|| breaker.last_error.clone()).flatten(),
            uptime_ms: millis(Instant::now().saturating_duration_since(shared.started)),
        }
    }
}
