//! Pool statistics published through the `metrics` crate facade (feature `metrics`).
//!
//! pool-core keeps its own counters, gauges and latency histograms ([`Pool::stats`],
//! [`Pool::status`]) so that it needs no metrics library. This module turns them into `metrics`
//! counters and gauges: a [`MetricsExporter`] is a small task that samples a pool periodically
//! (every [`DEFAULT_INTERVAL`] unless told otherwise) and sets every value below, labelled with the
//! pool's name, on whatever recorder the program installed (Prometheus, StatsD, …). Because the
//! values are samples, a scrape can be up to one interval behind the pool; call [`record`] for a
//! sample right now, and [`MetricsExporter::stop`] takes a last one.
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
//! | `pypool_queue_wait_seconds` | gauge | `quantile` = `0.5` \| `0.9` \| `0.99` \| `0.999` \| `1` | time from asking for a worker to getting one |
//! | `pypool_queue_wait_seconds_count` | counter | | samples behind `pypool_queue_wait_seconds` |
//! | `pypool_queue_wait_seconds_sum` | gauge | | their sum, in seconds |
//! | `pypool_call_duration_seconds` | gauge | `quantile` (as above) | execution time: from sending the call to the worker to its final reply (queue wait not included); successful calls only |
//! | `pypool_call_duration_seconds_count` | counter | | samples behind `pypool_call_duration_seconds` |
//! | `pypool_call_duration_seconds_sum` | gauge | | their sum, in seconds |
//!
//! The two latency distributions are published in the shape of a Prometheus *summary* (quantile
//! gauges plus `_count` and `_sum`), because pool-core exposes them as percentiles of its own HDR
//! histograms, not as individual samples; the quantiles cover the pool's whole life.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(pool: pypool::Pool) -> std::io::Result<()> {
//! use std::time::Duration;
//! use pypool::metrics::{serve_prometheus, MetricsExporter};
//!
//! // Serve http://127.0.0.1:9464/metrics (installs the global recorder), then publish the pool.
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
use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{BreakerState, LatencySummary, Pool};

/// How often a [`MetricsExporter`] samples its pool unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Registers the description and unit of every pypool metric with the installed recorder.
///
/// [`MetricsExporter::spawn`] calls it; call it yourself only if you use [`record`] alone.
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
    describe_gauge!(
        "pypool_queue_wait_seconds",
        Unit::Seconds,
        "Time from asking for a worker to getting one (quantiles since the pool started)."
    );
    describe_gauge!(
        "pypool_call_duration_seconds",
        Unit::Seconds,
        "Execution time from sending a call to its final reply, queue wait not included; successful calls (quantiles since the pool started)."
    );
}

/// Takes one sample of `pool` and sets every pypool metric on the installed recorder.
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

    summary(
        &name,
        &stats.queue_wait,
        [
            "pypool_queue_wait_seconds",
            "pypool_queue_wait_seconds_count",
            "pypool_queue_wait_seconds_sum",
        ],
    );
    summary(
        &name,
        &stats.call_time,
        [
            "pypool_call_duration_seconds",
            "pypool_call_duration_seconds_count",
            "pypool_call_duration_seconds_sum",
        ],
    );
}

/// Publishes a latency summary as quantile gauges (`base`) plus the `count` and `sum` metrics.
fn summary(pool: &str, latency: &LatencySummary, [base, count, sum]: [&'static str; 3]) {
    let seconds = |us: u64| us as f64 / 1e6;
    for (quantile, value) in [
        ("0.5", latency.p50_us),
        ("0.9", latency.p90_us),
        ("0.99", latency.p99_us),
        ("0.999", latency.p999_us),
        ("1", latency.max_us),
    ] {
        gauge!(base, "pool" => pool.to_owned(), "quantile" => quantile).set(seconds(value));
    }
    counter!(count, "pool" => pool.to_owned()).absolute(latency.count);
    gauge!(sum, "pool" => pool.to_owned()).set(latency.mean_us * latency.count as f64 / 1e6);
}

/// A task that samples a pool into the `metrics` facade every interval (see the
/// [module documentation](self) for the metrics).
///
/// The task holds a handle on the pool, so a pool with a running exporter is not dropped (and its
/// workers not killed) until the exporter stops: it stops by itself once the pool is shutting
/// down, when [`stop`](MetricsExporter::stop) is called, or when the exporter is dropped.
#[derive(Debug)]
pub struct MetricsExporter {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MetricsExporter {
    /// Registers the metric descriptions, takes a first sample at once and then one every
    /// `interval`. Must be called within a tokio runtime.
    pub fn spawn(pool: &Pool, interval: Duration) -> Self {
        describe();
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
        }
    }

    /// Takes a last sample and stops the task.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MetricsExporter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A Prometheus endpoint started by [`serve_prometheus`]: `metrics-exporter-prometheus`'s own
/// HTTP listener. Dropping it stops serving.
#[derive(Debug)]
pub struct PrometheusEndpoint {
    addr: SocketAddr,
    handle: PrometheusHandle,
    tasks: [JoinHandle<()>; 2],
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
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How often the recorder's upkeep runs (it drains histogram samples into their buckets).
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs a Prometheus recorder as the process's global `metrics` recorder and serves it at
/// `http://ADDR/metrics` with `metrics-exporter-prometheus`'s own HTTP listener, on the current
/// tokio runtime. Must be called within one.
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
    let (recorder, exporter) = PrometheusBuilder::new()
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
    let upkept = handle.clone();
    let upkeep = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP);
        loop {
            ticks.tick().await;
            upkept.run_upkeep();
        }
    });
    Ok(PrometheusEndpoint {
        addr,
        handle,
        tasks: [serve, upkeep],
    })
}
