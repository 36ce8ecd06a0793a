//! `pypool::metrics`: the names, labels and values a sample publishes and the latency histograms
//! every call feeds, on recorders of the tests' own (no global state) with pool-testkit's fake
//! workers; and once end to end, scraped from `serve_prometheus`'s HTTP listener while a pool of
//! real Python workers runs (the only test here that installs the global recorder).

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};
use pool_testkit::FakeLauncher;
use pypool::metrics::LATENCY_BUCKETS;
use pypool::{Pool, PoolConfig};
use serde_json::json;

/// A Prometheus recorder with pypool's latency buckets, not installed anywhere.
fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = pypool::metrics::prometheus_builder().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

/// The value of the one line of `text` that starts with `series` (name and labels) and a space.
fn value(text: &str, series: &str) -> f64 {
    let mut values = text.lines().filter_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.parse::<f64>().expect("a number"))
    });
    let found = values
        .next()
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert!(values.next().is_none(), "{series} twice in:\n{text}");
    found
}

/// Checks that `metric` of pool `pool` is a Prometheus histogram with every bucket of
/// [`LATENCY_BUCKETS`] (cumulative, so never decreasing) and `count` samples, and returns the
/// buckets' counts (`+Inf` last) and the sum.
fn histogram(text: &str, metric: &str, pool: &str, count: u64) -> (Vec<(String, u64)>, f64) {
    assert!(
        text.contains(&format!("# TYPE {metric} histogram")),
        "{metric} is not a histogram in:\n{text}"
    );
    assert!(
        !text.contains(&format!("{metric}{{pool=\"{pool}\",quantile=")),
        "{metric} has quantiles in:\n{text}"
    );
    let bounds = LATENCY_BUCKETS
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_owned()]);
    let buckets: Vec<(String, u64)> = bounds
        .map(|le| {
            let n = value(
                text,
                &format!("{metric}_bucket{{pool=\"{pool}\",le=\"{le}\"}}"),
            );
            (le, n as u64)
        })
        .collect();
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{metric}'s buckets are not cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last().map(|b| b.1), Some(count), "{metric} +Inf");
    let series = format!("{{pool=\"{pool}\"}}");
    assert_eq!(
        value(text, &format!("{metric}_count{series}")),
        count as f64
    );
    (buckets, value(text, &format!("{metric}_sum{series}")))
}

/// The count of the bucket `le` in `buckets`.
fn bucket(buckets: &[(String, u64)], le: &str) -> u64 {
    buckets
        .iter()
        .find(|(bound, _)| bound == le)
        .unwrap_or_else(|| panic!("no bucket {le}"))
        .1
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_sample_publishes_every_metric_with_its_labels() {
    let launcher = FakeLauncher::builder().build();
    let pool = Pool::start(
        PoolConfig::new("app.py").name("models").size(2),
        launcher.clone(),
    )
    .await
    .expect("the fake pool starts");
    for i in 0..5 {
        pool.call("add", json!({"a": i, "b": 1}))
            .await
            .expect("add");
    }
    let err = pool.call("fail", json!({"message": "no"})).await;
    assert!(err.is_err());
    pool.session("s1")
        .call("remember", json!({"key": "k", "value": 1}))
        .await
        .expect("remember");

    let (recorder, handle) = recorder();
    metrics::with_local_recorder(&recorder, || {
        pypool::metrics::describe();
        pypool::metrics::record(&pool);
    });
    let text = handle.render();
    for expected in [
        "# TYPE pypool_calls_total counter",
        "pypool_calls_total{pool=\"models\",outcome=\"ok\"} 6",
        "pypool_calls_total{pool=\"models\",outcome=\"failed\"} 1",
        "pypool_call_errors_total{pool=\"models\",kind=\"handler\"} 1",
        "pypool_call_errors_total{pool=\"models\",kind=\"checkout_timeout\"} 0",
        "pypool_worker_events_total{pool=\"models\",event=\"launched\"} 2",
        "pypool_worker_events_total{pool=\"models\",event=\"crashed\"} 0",
        "pypool_late_replies_dropped_total{pool=\"models\"} 0",
        "# TYPE pypool_workers gauge",
        "pypool_workers{pool=\"models\",state=\"ready\"} 2",
        "pypool_workers{pool=\"models\",state=\"busy\"} 0",
        "pypool_calls_in_flight{pool=\"models\"} 0",
        "pypool_waiters{pool=\"models\"} 0",
        "pypool_sessions{pool=\"models\"} 1",
        "pypool_circuit_breaker{pool=\"models\",state=\"closed\"} 1",
        "pypool_circuit_breaker{pool=\"models\",state=\"open\"} 0",
        "# HELP pypool_calls_total Finished calls, by outcome.",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // Latencies are not sampled: the call observer records them call by call.
    assert!(!text.contains("pypool_queue_wait_seconds"), "{text}");
    assert!(!text.contains("pypool_call_duration_seconds"), "{text}");
    pool.shutdown(Duration::from_secs(1)).await;
    launcher.assert_all_gone();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_exporter_stops_when_the_pool_shuts_down() {
    let launcher = FakeLauncher::builder().build();
    let pool = Pool::start(PoolConfig::new("app.py").size(1), launcher.clone())
        .await
        .expect("the fake pool starts");
    let exporter = pypool::metrics::MetricsExporter::spawn(&pool, Duration::from_millis(100));
    pool.shutdown(Duration::from_secs(1)).await;
    // The task sees the shutdown at its next tick and ends; stop() then returns at once.
    tokio::time::timeout(Duration::from_secs(5), exporter.stop())
        .await
        .expect("the exporter stops");
    drop(pool);
    launcher.assert_all_gone();
}

/// Every call lands in the histograms as it finishes, with its own time (paused time makes them
/// exact), from when the exporter is spawned until it stops.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_call_is_recorded_in_the_latency_histograms_while_the_exporter_runs() {
    let launcher = FakeLauncher::builder().build();
    let mut config = PoolConfig::new("app.py").name("models").size(1);
    // No calls queued at the worker: a call waits in the pool's queue until the worker is free.
    config.prefetch = 0;
    let pool = Pool::start(config, launcher.clone())
        .await
        .expect("the fake pool starts");
    pool.call("add", json!({"a": 1, "b": 1}))
        .await
        .expect("a call before the exporter");

    let (recorder, handle) = recorder();
    // The histograms are registered with the recorder current when the exporter is spawned.
    let exporter = metrics::with_local_recorder(&recorder, || {
        pypool::metrics::MetricsExporter::spawn(&pool, Duration::from_secs(3600))
    });
    // Three sleeps of 0.2 s at once on one worker that takes one call at a time: they run one
    // after another, so they wait 0, 0.2 and 0.4 s for it.
    let sleeps = (0..3).map(|_| pool.call("sleep", json!({"seconds": 0.2})));
    for reply in futures::future::join_all(sleeps).await {
        reply.expect("sleep");
    }
    for i in 0..4 {
        pool.call("add", json!({"a": i, "b": 1}))
            .await
            .expect("add");
    }
    pool.call("fail", json!({"message": "no"}))
        .await
        .expect_err("fail fails");
    exporter.stop().await;
    pool.call("add", json!({"a": 1, "b": 1}))
        .await
        .expect("a call after the exporter");

    let text = handle.render();
    // 3 + 4 + 1 calls got a worker while the exporter ran; 3 + 4 succeeded.
    let (waits, wait_sum) = histogram(&text, "pypool_queue_wait_seconds", "models", 8);
    let (durations, duration_sum) = histogram(&text, "pypool_call_duration_seconds", "models", 7);
    assert_eq!(bucket(&waits, "0.00005"), 6, "{waits:?}");
    assert_eq!(bucket(&waits, "0.25"), 7, "{waits:?}");
    assert!((wait_sum - 0.6).abs() < 1e-3, "{wait_sum}");
    assert_eq!(bucket(&durations, "0.1"), 4, "{durations:?}");
    assert_eq!(bucket(&durations, "0.25"), 7, "{durations:?}");
    assert!((duration_sum - 0.6).abs() < 1e-3, "{duration_sum}");
    assert!(
        text.contains("# HELP pypool_call_duration_seconds Execution time"),
        "{text}"
    );

    // The pool's own statistics saw the same calls, plus the ones before and after.
    let stats = pool.stats();
    assert_eq!(stats.queue_wait.count, 10);
    assert_eq!(stats.call_time.count, 9);
    pool.shutdown(Duration::from_secs(1)).await;
    launcher.assert_all_gone();
}

/// End to end: real Python workers over stdio, the exporter's own HTTP listener, a scrape.
#[cfg(feature = "stdio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_real_calls_as_prometheus_histograms() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HANDLERS: &str = r#"
import time
from pypool_worker import handler

@handler
def nap(seconds):
    time.sleep(seconds)
    return seconds
"#;
    const CALLS: u64 = 6;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let app = dir.path().join("handlers.py");
    std::fs::write(&app, HANDLERS).expect("write handlers.py");
    let python = std::env::var("PYPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());

    let endpoint = pypool::metrics::serve_prometheus("127.0.0.1:0".parse().unwrap())
        .await
        .expect("serve metrics");
    let pool = pypool::builder(app.to_string_lossy())
        .name("real")
        .size(2)
        .python(python)
        .transport("stdio")
        .start()
        .await
        .expect("the pool starts");
    let exporter = pypool::metrics::MetricsExporter::spawn(&pool, Duration::from_secs(3600));
    let naps = (0..CALLS).map(|_| pool.call("nap", json!({"seconds": 0.02})));
    for reply in futures::future::join_all(naps).await {
        reply.expect("nap");
    }
    // Stopping takes a last sample of the counters; the histograms are already up to date.
    exporter.stop().await;

    let mut stream = tokio::net::TcpStream::connect(endpoint.local_addr())
        .await
        .expect("connect to the endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let (durations, sum) = histogram(&response, "pypool_call_duration_seconds", "real", CALLS);
    // Every call slept 20 ms in Python: none is faster than 10 ms, and the times are seconds.
    assert_eq!(bucket(&durations, "0.01"), 0, "{durations:?}");
    assert!(sum >= 0.02 * CALLS as f64 && sum < 60.0, "{sum}");
    histogram(&response, "pypool_queue_wait_seconds", "real", CALLS);
    assert_eq!(
        value(
            &response,
            "pypool_calls_total{pool=\"real\",outcome=\"ok\"}"
        ),
        CALLS as f64
    );
    assert_eq!(
        value(&response, "pypool_workers{pool=\"real\",state=\"ready\"}"),
        2.0
    );

    let pids: Vec<u32> = pool.status().workers.iter().filter_map(|w| w.pid).collect();
    pool.shutdown(Duration::from_secs(5)).await;
    for pid in pids {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "worker {pid} outlived the pool");
    }
}
