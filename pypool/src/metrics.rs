//! Pool statistics published through the `metrics` crate facade (feature `metrics`).
//!
//! pool-core keeps its own counters, gauges and latency histograms ([`Pool::stats`],
//! [`Pool::status`]) so that it needs no metrics library. This module hands them to whatever
//! recorder the program installed (Prometheus, StatsD, …), labelled with the pool's name, in two
//! ways:
//!
//! - the latencies as real histograms: a [call observer](call_observer) records every call's
//!   queue wait and execution time with `metrics::histogram!` the moment the pool measures it;
//! - the counters and gauges as samples: a [`MetricsExporter`] is a small task that samples the
//!   pool periodically (every [`DEFAULT_INTERVAL`] unless told otherwise), so a scrape can be up
//!   to one interval behind the pool; call [`record`] for a sample right now, and
//!   [`MetricsExporter::stop`] takes a last one.
//!
//! [`MetricsExporter::spawn`] does both. Install the recorder first: the histograms are
//! registered with the recorder installed when the observer is made.
//!
//! # Metrics
//!
//! Names follow the Prometheus conventions (base units, `_total` on counters). Every metric has
//! the label `pool` (the pool's [name](crate::PoolConfig::name)).
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `pypool_calls_total` | counter | `outcome` = `ok` \| `failed` | finished calls |
//! | `pypool_call_errors_total` | counter | `kind` = `handler` \| `checkout_timeout` \| `call_timeout` \| `saturated` \| `circuit_open` | failed calls by cause (a call can fail for other reasons too: crashes, shutdown) |
//! | `pypool_worker_events_total` | counter | `event` = `launched` \| `launch_failed` \| `crashed` \| `killed` \| `recycled` \| `retired_overflow` | worker life-cycle events |
//! | `pypool_cancels_sent_total` | counter | | CANCEL messages sent to workers |
//! | `pypool_pings_missed_total` | counter | | health pings that went unanswered |
//! | `pypool_sessions_expired_total` | counter | | sessions ended by their TTL |
//! | `pypool_late_replies_dropped_total` | counter | | replies for unknown or finished calls, dropped |
//! | `pypool_workers` | gauge | `state` = `ready` \| `busy` \| `draining` \| `starting` | workers in each state |
//! | `pypool_calls_in_flight` | gauge | | calls running on workers |
//! | `pypool_waiters` | gauge | | callers queued for a worker |
//! | `pypool_sessions` | gauge | | sessions in the registry |
//! | `pypool_circuit_breaker` | gauge | `state` = `closed` \| `open` \| `half_open` | 1 for the breaker's current state, 0 for the others |
//! | `pypool_queue_wait_seconds` | histogram | | time from asking for a worker to getting one, for every call that got one |
//! | `pypool_call_duration_seconds` | histogram | | execution time: from sending the call to the worker to its final reply (queue wait not included); successful calls only |
//!
//! The histograms hold every sample since the observer was attached (a [map](crate::Pool::map)
//! counts each chunk it sends as one call). In Prometheus they are histograms (`_bucket{le}`,
//! `_sum`, `_count`) with the bounds [`LATENCY_BUCKETS`] when the recorder was built by
//! [`serve_prometheus`] or from [`prometheus_builder`]; a Prometheus recorder built without
//! buckets for them renders them as summaries.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(pool: pypool::Pool) -> std::io::Result<()> {
//! use std::time::Duration;
//! use pypool::metrics::{serve_prometheus, MetricsExporter};
//!
//! // Serve http://127.0.0.1:9464/metrics (installs the global recorder), then publish the pool:
//! // its counters and gauges every second, its latencies call by call.
//! let endpoint = serve_prometheus("127.0.0.1:9464".parse().unwrap()).await?;
//! let exporter = MetricsExporter::spawn(&pool, Duration::from_secs(1));
//! // ... the service runs ...
//! exporter.stop().await;
//! pool.shutdown(Duration::from_secs(5)).await;
//! # drop(endpoint);
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{BreakerState, CallEvent, CallObserver, CallObserverId, Pool};

/// How often a [`MetricsExporter`] samples its pool unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The queue-wait histogram's name.
const QUEUE_WAIT: &str = "pypool_queue_wait_seconds";
/// The execution-time histogram's name.
const CALL_DURATION: &str = "pypool_call_duration_seconds";

/// Upper bounds, in seconds, of the latency histograms' buckets in Prometheus: from 50 µs (a
/// free worker handed over, a trivial handler) to 60 s (the default `call_timeout`), about three
/// to a decade. Prometheus adds `+Inf`.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A Prometheus exporter builder that renders pypool's latency histograms as Prometheus
/// histograms with [`LATENCY_BUCKETS`]. Start from it when you install the Prometheus recorder
/// yourself instead of with [`serve_prometheus`].
pub fn prometheus_builder() -> PrometheusBuilder {
    [QUEUE_WAIT, CALL_DURATION]
        .into_iter()
        .try_fold(PrometheusBuilder::new(), |builder, name| {
            builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), LATENCY_BUCKETS)
        })
        .expect("LATENCY_BUCKETS is not empty")
}

/// A call observer that records every call of `pool` in the latency histograms
/// (`pypool_queue_wait_seconds`, `pypool_call_duration_seconds`, labelled with the pool's name)
/// on the recorder installed now. Attach it with [`Pool::add_call_observer`];
/// [`MetricsExporter::spawn`] does.
pub fn call_observer(pool: &Pool) -> Arc<dyn CallObserver> {
    let name = pool.name().to_owned();
    // Registered once: a sample is then one record on the recorder's histogram, no lookup.
    let queue_wait = histogram!(QUEUE_WAIT, "pool" => name.clone());
    let call_duration = histogram!(CALL_DURATION, "pool" => name);
    Arc::new(move |event: CallEvent| match event {
        CallEvent::CheckedOut { waited, .. } => queue_wait.record(waited.as_secs_f64()),
        CallEvent::Succeeded { took, .. } => call_duration.record(took.as_secs_f64()),
        _ => {}
    })
}

/// Registers the description and unit of every pypool metric with the installed recorder.
///
/// [`MetricsExporter::spawn`] calls it; call it yourself only if you use [`record`] and
/// [`call_observer`] alone.
pub fn describe() {
    describe_counter!("pypool_calls_total", "Finished calls, by outcome.");
    describe_counter!(
        "pypool_call_errors_total",
        "Failed calls, by cause (handler exception, time limits, saturation, open breaker)."
    );
    describe_counter!(
        "pypool_worker_events_total",
        "Worker life-cycle events: launches, failed launches, crashes, kills, recycling."
    );
    describe_counter!(
        "pypool_cancels_sent_total",
        "CANCEL messages sent to workers."
    );
    describe_counter!(
        "pypool_pings_missed_total",
        "Health pings that went unanswered."
    );
    describe_counter!(
        "pypool_sessions_expired_total",
        "Sessions ended by their TTL."
    );
    describe_counter!(
        "pypool_late_replies_dropped_total",
        "Replies for unknown or finished calls, dropped and never delivered."
    );
    describe_gauge!("pypool_workers", "Workers in each state.");
    describe_gauge!("pypool_calls_in_flight", "Calls running on workers.");
    describe_gauge!("pypool_waiters", "Callers queued for a worker.");
    describe_gauge!("pypool_sessions", "Sessions in the registry.");
    describe_gauge!(
        "pypool_circuit_breaker",
        "1 for the circuit breaker's current state, 0 for the others."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time from asking for a worker to getting one."
    );
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Execution time from sending a call to its final reply, queue wait not included; successful calls."
    );
}

/// Takes one sample of `pool` and sets every pypool counter and gauge on the installed recorder
/// (the latency histograms are recorded call by call by [`call_observer`]).
pub fn record(pool: &Pool) {
    let stats = pool.stats();
    let status = pool.status();
    let name = stats.pool.clone();
    let c = &stats.counters;

    let pool_counter = |metric: &'static str, value: u64| {
        counter!(metric, "pool" => name.clone()).absolute(value);
    };
    counter!("pypool_calls_total", "pool" => name.clone(), "outcome" => "ok").absolute(c.calls_ok);
    counter!("pypool_calls_total", "pool" => name.clone(), "outcome" => "failed")
        .absolute(c.calls_failed);
    for (kind, value) in [
        ("handler", c.handler_errors),
        ("checkout_timeout", c.checkout_timeouts),
        ("call_timeout", c.call_timeouts),
        ("saturated", c.saturated),
        ("circuit_open", c.circuit_rejections),
    ] {
        counter!("pypool_call_errors_total", "pool" => name.clone(), "kind" => kind)
            .absolute(value);
    }
    for (event, value) in [
        ("launched", c.launches),
        ("launch_failed", c.launch_failures),
        ("crashed", c.crashes),
        ("killed", c.killed),
        ("recycled", c.recycled),
        ("retired_overflow", c.retired_overflow),
    ] {
        counter!("pypool_worker_events_total", "pool" => name.clone(), "event" => event)
            .absolute(value);
    }
    pool_counter("pypool_cancels_sent_total", c.cancels_sent);
    pool_counter("pypool_pings_missed_total", c.pings_missed);
    pool_counter("pypool_sessions_expired_total", c.sessions_expired);
    pool_counter("pypool_late_replies_dropped_total", c.late_replies_dropped);

    let g = &status.gauges;
    for (state, value) in [
        ("ready", g.workers_ready),
        ("busy", g.workers_busy),
        ("draining", g.workers_draining),
        ("starting", g.workers_starting),
    ] {
        gauge!("pypool_workers", "pool" => name.clone(), "state" => state).set(value as f64);
    }
    gauge!("pypool_calls_in_flight", "pool" => name.clone()).set(g.calls_in_flight as f64);
    gauge!("pypool_waiters", "pool" => name.clone()).set(g.waiters as f64);
    gauge!("pypool_sessions", "pool" => name.clone()).set(g.sessions as f64);
    for (state, label) in [
        (BreakerState::Closed, "closed"),
        (BreakerState::Open, "open"),
        (BreakerState::HalfOpen, "half_open"),
    ] {
        let on = if status.breaker == state { 1.0 } else { 0.0 };
        gauge!("pypool_circuit_breaker", "pool" => name.clone(), "state" => label).set(on);
    }
}

/// Publishes a pool (see the [module documentation](self) for the metrics): a task that
/// samples its counters and gauges into the `metrics` facade every interval, and a
/// [call observer](call_observer) that records every call in the latency histograms.
///
/// The exporter holds a handle on the pool, so a pool with an exporter is not dropped (and its
/// workers not killed) until the exporter is [stopped](MetricsExporter::stop) or dropped. Its
/// sampling task also ends by itself once the pool is shutting down; the observer stays attached
/// until the exporter stops, so calls that finish during a shutdown are still recorded.
#[derive(Debug)]
pub struct MetricsExporter {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    observer: Option<Attached>,
}

/// A call observer attached to a pool, detached when this is dropped.
struct Attached {
    pool: Pool,
    id: CallObserverId,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.pool.remove_call_observer(self.id);
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("pool", &self.pool.name())
            .field("id", &self.id)
            .finish()
    }
}

impl MetricsExporter {
    /// Registers the metric descriptions, attaches the [call observer](call_observer), takes a
    /// first sample at once and then one every `interval`. Must be called within a tokio
    /// runtime, after the recorder is installed.
    pub fn spawn(pool: &Pool, interval: Duration) -> Self {
        describe();
        let observer = Attached {
            pool: pool.clone(),
            id: pool.add_call_observer(call_observer(pool)),
        };
        let pool = pool.clone();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let interval = interval.max(Duration::from_millis(10));
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = &mut stopped => break,
                }
                record(&pool);
                if pool.status().shutting_down {
                    return;
                }
            }
            // Asked to stop: one last sample so the final numbers are published.
            record(&pool);
        });
        MetricsExporter {
            stop: Some(stop),
            task: Some(task),
            observer: Some(observer),
        }
    }

    /// Takes a last sample, stops the task and detaches the call observer.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.observer.take();
    }
}

impl Drop for MetricsExporter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // `observer` detaches itself as it is dropped.
    }
}

/// A Prometheus endpoint started by [`serve_prometheus`]: `metrics-exporter-prometheus`'s own
/// HTTP listener. Dropping it stops serving.
#[derive(Debug)]
pub struct PrometheusEndpoint {
    addr: SocketAddr,
    handle: PrometheusHandle,
    serve: JoinHandle<()>,
}

impl PrometheusEndpoint {
    /// The address it listens on (with the real port when it was asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to scrape: `http://ADDR/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// The Prometheus recorder's handle: [`render`](PrometheusHandle::render) gives the text a
    /// scrape returns.
    pub fn handle(&self) -> &PrometheusHandle {
        &self.handle
    }
}

impl Drop for PrometheusEndpoint {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

/// Installs a Prometheus recorder as the process's global `metrics` recorder and serves it at
/// `http://ADDR/metrics` with `metrics-exporter-prometheus`'s own HTTP listener, on the current
/// tokio runtime. Must be called within one. The recorder comes from [`prometheus_builder`], so
/// the latency histograms have the buckets [`LATENCY_BUCKETS`]; the exporter runs its own
/// upkeep.
///
/// Port 0 picks a free port (see [`PrometheusEndpoint::local_addr`]): the exporter does not
/// report the port it bound, so pypool binds a free one, releases it and hands it to the
/// exporter. In the moment between, another process could take it; then this fails with an
/// "address in use" error rather than serving elsewhere. Services should name their port.
///
/// Fails if the address cannot be bound or if a global recorder is already installed.
pub async fn serve_prometheus(addr: SocketAddr) -> io::Result<PrometheusEndpoint> {
    let addr = if addr.port() == 0 {
        std::net::TcpListener::bind(addr)?.local_addr()?
    } else {
        addr
    };
    let (recorder, exporter) = prometheus_builder()
        .with_http_listener(addr)
        .build()
        .map_err(|err| io::Error::new(io::ErrorKind::AddrInUse, err.to_string()))?;
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder)
        .map_err(|err| io::Error::other(format!("cannot install the metrics recorder: {err}")))?;
    let serve = tokio::spawn(async move {
        if let Err(err) = exporter.await {
            tracing::warn!(error = ?err, "the Prometheus endpoint stopped");
        }
    });
    Ok(PrometheusEndpoint {
        addr,
        handle,
        serve,
    })
}
