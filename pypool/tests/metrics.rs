//! `pypool::metrics`: the names, labels and values a sample publishes, on a recorder of the
//! test's own (no global state), with pool-testkit's fake workers.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use pool_testkit::FakeLauncher;
use pypool::{Pool, PoolConfig};
use serde_json::json;

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

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
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
        "pypool_queue_wait_seconds_count{pool=\"models\"} 7",
        "pypool_queue_wait_seconds{pool=\"models\",quantile=\"0.5\"}",
        "pypool_call_duration_seconds_count{pool=\"models\"} 6",
        "pypool_call_duration_seconds_sum{pool=\"models\"}",
        "# HELP pypool_calls_total Finished calls, by outcome.",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
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
