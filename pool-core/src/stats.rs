//! Counters, gauges and latency histograms, and the serialisable snapshots the pool reports.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::config::Affinity;

/// The pool's running counters and histograms. Cheap to update from any task.
pub(crate) struct Metrics {
    pub calls_ok: AtomicU64,
    pub calls_failed: AtomicU64,
    pub handler_errors: AtomicU64,
    pub checkout_timeouts: AtomicU64,
    pub call_timeouts: AtomicU64,
    pub saturated: AtomicU64,
    pub circuit_rejections: AtomicU64,
    pub crashes: AtomicU64,
    pub killed: AtomicU64,
    pub launches: AtomicU64,
    pub launch_failures: AtomicU64,
    pub recycled: AtomicU64,
    pub retired_overflow: AtomicU64,
    pub cancels_sent: AtomicU64,
    pub pings_missed: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Shared with every worker's reader, which counts replies nobody waits for.
    pub late_replies: Arc<AtomicU64>,
    queue_wait: Mutex<Histogram<u64>>,
    call_time: Mutex<Histogram<u64>>,
    /// The attached [`CallObserver`]s, replaced as a whole when one is attached or detached, so
    /// that notifying them holds no lock.
    observers: RwLock<Observers>,
    /// Whether `observers` is not empty: without observers, a sample costs this one load.
    observed: AtomicBool,
    next_observer: AtomicU64,
}

/// A measurement of one call, handed to every [`CallObserver`] of its pool as it is taken.
///
/// These are the samples behind [`PoolStats::queue_wait`] and [`PoolStats::call_time`]: an
/// observer sees each of them once, when the pool records it. A [`map`](crate::Pool::map) sends
/// its items in chunks, and each chunk is one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallEvent {
    /// A call got a worker: `waited` is the time from asking for one to getting it (its wait in
    /// the queue). Every call that reaches a worker has one, whatever its outcome.
    #[non_exhaustive]
    CheckedOut {
        /// Time from asking for a worker to getting one.
        waited: Duration,
    },
    /// A call succeeded: `took` is its execution time, from sending it to the worker to its final
    /// reply (queue wait not included). Failed calls have none.
    #[non_exhaustive]
    Succeeded {
        /// Time from sending the call to its final reply.
        took: Duration,
    },
}

/// Sees every call's measurements as the pool takes them: attach one with
/// [`Pool::add_call_observer`](crate::Pool::add_call_observer), for instance to feed a metrics
/// library's histograms with every sample instead of sampling [`Pool::stats`](crate::Pool::stats).
///
/// [`observe`](CallObserver::observe) runs on the calling task, inside the call path: it must be
/// quick, must not block, and must not panic. Any `Fn(CallEvent) + Send + Sync` closure is an
/// observer.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use pool_core::{CallEvent, Pool};
///
/// async fn count_slow_calls(pool: &Pool) -> pool_core::Result<u64> {
///     let slow = Arc::new(AtomicU64::new(0));
///     let counted = slow.clone();
///     let id = pool.add_call_observer(Arc::new(move |event: CallEvent| {
///         if let CallEvent::Succeeded { took, .. } = event {
///             if took.as_secs_f64() > 0.1 {
///                 counted.fetch_add(1, Ordering::Relaxed);
///             }
///         }
///     }));
///     pool.call("predict", ()).await?;
///     pool.remove_call_observer(id);
///     Ok(slow.load(Ordering::Relaxed))
/// }
/// ```
pub trait CallObserver: Send + Sync {
    /// Called with each measurement, on the task that made the call.
    fn observe(&self, event: CallEvent);
}

impl<F> CallObserver for F
where
    F: Fn(CallEvent) + Send + Sync,
{
    fn observe(&self, event: CallEvent) {
        self(event)
    }
}

/// Names an attached [`CallObserver`], to detach it with
/// [`Pool::remove_call_observer`](crate::Pool::remove_call_observer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallObserverId(u64);

/// The attached call observers, by id.
type Observers = Arc<[(CallObserverId, Arc<dyn CallObserver>)]>;

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            calls_ok: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            handler_errors: AtomicU64::new(0),
            checkout_timeouts: AtomicU64::new(0),
            call_timeouts: AtomicU64::new(0),
            saturated: AtomicU64::new(0),
            circuit_rejections: AtomicU64::new(0),
            crashes: AtomicU64::new(0),
            killed: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            launch_failures: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            retired_overflow: AtomicU64::new(0),
            cancels_sent: AtomicU64::new(0),
            pings_missed: AtomicU64::new(0),
            sessions_expired: AtomicU64::new(0),
            late_replies: Arc::new(AtomicU64::new(0)),
            queue_wait: Mutex::new(histogram()),
            call_time: Mutex::new(histogram()),
            observers: RwLock::new(Arc::new([])),
            observed: AtomicBool::new(false),
            next_observer: AtomicU64::new(0),
        }
    }

    pub(crate) fn add_observer(&self, observer: Arc<dyn CallObserver>) -> CallObserverId {
        let id = CallObserverId(self.next_observer.fetch_add(1, Ordering::Relaxed));
        let mut observers = self.observers.write();
        let mut list = observers.to_vec();
        list.push((id, observer));
        *observers = list.into();
        self.observed.store(true, Ordering::Release);
        id
    }

    pub(crate) fn remove_observer(&self, id: CallObserverId) -> bool {
        let mut observers = self.observers.write();
        let before = observers.len();
        let list: Vec<_> = observers
            .iter()
            .filter(|(o, _)| *o != id)
            .cloned()
            .collect();
        let removed = list.len() < before;
        self.observed.store(!list.is_empty(), Ordering::Release);
        *observers = list.into();
        removed
    }

    fn notify(&self, event: CallEvent) {
        if !self.observed.load(Ordering::Acquire) {
            return;
        }
        let observers = self.observers.read().clone();
        for (_, observer) in observers.iter() {
            observer.observe(event);
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_queue_wait(&self, waited: Duration) {
        self.queue_wait.lock().saturating_record(micros(waited));
        self.notify(CallEvent::CheckedOut { waited });
    }

    pub(crate) fn record_call_time(&self, took: Duration) {
        self.call_time.lock().saturating_record(micros(took));
        self.notify(CallEvent::Succeeded { took });
    }

    pub(crate) fn counters(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            calls_ok: get(&self.calls_ok),
            calls_failed: get(&self.calls_failed),
            handler_errors: get(&self.handler_errors),
            checkout_timeouts: get(&self.checkout_timeouts),
            call_timeouts: get(&self.call_timeouts),
            saturated: get(&self.saturated),
            circuit_rejections: get(&self.circuit_rejections),
            crashes: get(&self.crashes),
            killed: get(&self.killed),
            launches: get(&self.launches),
            launch_failures: get(&self.launch_failures),
            recycled: get(&self.recycled),
            retired_overflow: get(&self.retired_overflow),
            cancels_sent: get(&self.cancels_sent),
            pings_missed: get(&self.pings_missed),
            sessions_expired: get(&self.sessions_expired),
            late_replies_dropped: get(&self.late_replies),
        }
    }

    pub(crate) fn queue_wait(&self) -> LatencySummary {
        LatencySummary::of(&self.queue_wait.lock())
    }

    pub(crate) fn call_time(&self) -> LatencySummary {
        LatencySummary::of(&self.call_time.lock())
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, u64::MAX as u128) as u64
}

/// Monotonic counters since the pool started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Calls that returned a value.
    pub calls_ok: u64,
    /// Calls that returned an error of any kind.
    pub calls_failed: u64,
    /// Calls whose handler raised.
    pub handler_errors: u64,
    /// Calls that found no worker within `checkout_timeout` (or their deadline).
    pub checkout_timeouts: u64,
    /// Calls that ran past `call_timeout` (or their deadline).
    pub call_timeouts: u64,
    /// Calls refused because `max_waiters` callers were already waiting.
    pub saturated: u64,
    /// Calls refused at once because the circuit breaker was open.
    pub circuit_rejections: u64,
    /// Workers that died without being asked to.
    pub crashes: u64,
    /// Workers the pool killed (unanswered cancel, missed pings).
    pub killed: u64,
    /// Workers launched successfully (handshake done).
    pub launches: u64,
    /// Launches or handshakes that failed.
    pub launch_failures: u64,
    /// Workers retired by `max_calls`, `max_age` or `max_rss`.
    pub recycled: u64,
    /// Overflow workers retired after `overflow_idle`.
    pub retired_overflow: u64,
    /// CANCEL messages sent (timeouts and dropped callers).
    pub cancels_sent: u64,
    /// Pings that went unanswered.
    pub pings_missed: u64,
    /// Sessions ended by their TTL.
    pub sessions_expired: u64,
    /// Replies that arrived for unknown or finished calls and were dropped.
    pub late_replies_dropped: u64,
}

/// A latency distribution in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarises an HDR histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Gauges: the pool right now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gauges {
    /// Workers with a free slot.
    pub workers_ready: usize,
    /// Workers whose every slot is taken.
    pub workers_busy: usize,
    /// Workers finishing their last calls before retirement.
    pub workers_draining: usize,
    /// Workers being launched.
    pub workers_starting: usize,
    /// Calls in flight.
    pub calls_in_flight: usize,
    /// Callers waiting for a worker.
    pub waiters: usize,
    /// Sessions in the registry.
    pub sessions: usize,
}

/// [`Pool::stats`](crate::Pool::stats): counters, gauges and latency histograms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    /// The pool's name.
    pub pool: String,
    /// Counters since start.
    pub counters: Counters,
    /// The pool right now.
    pub gauges: Gauges,
    /// Time from asking for a worker to getting one, for every call that got one.
    pub queue_wait: LatencySummary,
    /// Execution time of successful calls: from sending the call to the worker to its final
    /// reply (queue wait not included).
    pub call_time: LatencySummary,
}

/// A worker's place in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Handshake done, at least one free slot.
    Ready,
    /// Every slot taken.
    Busy,
    /// Takes no new calls; stops once its calls finish.
    Draining,
    /// Due for recycling: still serving until its replacement is up (and, while Strict sessions
    /// are bound to it, until they end).
    Recycling,
}

/// One worker in [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Id in the pool.
    pub id: String,
    /// Process id.
    pub pid: Option<u32>,
    /// State.
    pub state: WorkerState,
    /// Whether it is a temporary overflow worker.
    pub overflow: bool,
    /// Calls running now.
    pub in_flight: usize,
    /// Calls it accepts at once.
    pub max_in_flight: usize,
    /// Calls it has taken.
    pub calls: u64,
    /// Time since its handshake.
    pub age_ms: u64,
    /// Time since it last finished a call.
    pub idle_ms: u64,
    /// Resident memory, when known.
    pub rss_bytes: Option<u64>,
    /// Pings missed in a row.
    pub missed_pings: u32,
    /// Interpreter version from HELLO.
    pub python: String,
    /// The header codec chosen at the handshake: `msgpack`, `marshal` or `json`.
    #[serde(default)]
    pub codec: String,
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Launches proceed.
    Closed,
    /// Launches keep failing; calls with no live worker fail fast.
    Open,
    /// One trial launch is under way.
    HalfOpen,
}

/// One session in [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// Session id.
    pub id: String,
    /// Affinity.
    pub affinity: Affinity,
    /// Time since its first call.
    pub age_ms: u64,
    /// Time since its last call.
    pub idle_ms: u64,
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// The worker that served it last.
    pub last_worker: Option<String>,
}

/// [`Pool::status`](crate::Pool::status): what every worker and session is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub pool: String,
    /// The launcher's transport name.
    pub transport: String,
    /// Whether the pool is shutting down.
    pub shutting_down: bool,
    /// Time since the pool started.
    pub uptime_ms: u64,
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// Consecutive launch failures.
    pub launch_failures_in_a_row: u32,
    /// The last launch or handshake error.
    pub last_launch_error: Option<String>,
    /// Live workers, in the order they were started (by worker number).
    pub workers: Vec<WorkerStatus>,
    /// Gauges.
    pub gauges: Gauges,
    /// Sessions.
    pub sessions: Vec<SessionStatus>,
}

/// How well the pool can serve, from [`Pool::health`](crate::Pool::health): for readiness and
/// liveness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// As many workers as `size` are live and launches work.
    Healthy,
    /// Calls are served, but by fewer workers than `size`, or launches are failing.
    Degraded,
    /// No worker can take calls (none is live, or the pool is shutting down).
    Unavailable,
}

/// A quick health summary; see [`PoolStatus`] for everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The verdict.
    pub state: HealthState,
    /// Workers that can take calls now or after their current ones.
    pub live_workers: usize,
    /// `size`: the permanent workers the pool keeps.
    pub wanted_workers: usize,
    /// Workers being launched.
    pub starting_workers: usize,
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// The last launch error, while launches are failing.
    pub last_launch_error: Option<String>,
    /// Time since the pool started.
    pub uptime_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observers_see_every_sample_until_removed() {
        let metrics = Metrics::new();
        // Nothing attached: samples are only recorded.
        metrics.record_queue_wait(Duration::from_millis(1));

        let seen = Arc::new(Mutex::new(Vec::new()));
        let first = {
            let seen = seen.clone();
            metrics.add_observer(Arc::new(move |event| seen.lock().push((1, event))))
        };
        let second = {
            let seen = seen.clone();
            metrics.add_observer(Arc::new(move |event| seen.lock().push((2, event))))
        };
        metrics.record_queue_wait(Duration::from_millis(2));
        assert!(metrics.remove_observer(first));
        assert!(!metrics.remove_observer(first), "already removed");
        metrics.record_call_time(Duration::from_millis(3));
        assert!(metrics.remove_observer(second));
        metrics.record_call_time(Duration::from_millis(4));

        let waited = |ms| CallEvent::CheckedOut {
            waited: Duration::from_millis(ms),
        };
        let took = |ms| CallEvent::Succeeded {
            took: Duration::from_millis(ms),
        };
        assert_eq!(*seen.lock(), [(1, waited(2)), (2, waited(2)), (2, took(3))]);
        assert_eq!(metrics.queue_wait().count, 2);
        assert_eq!(metrics.call_time().count, 2);
    }
}
