//! Start-up, calls, errors and the original pool's failing scenario.

mod common;

use common::*;
use futures::future::join_all;
use pool_core::{Error, Pool};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn start_is_concurrent_and_waits_for_every_handshake() {
    let launcher = FakeLauncher::builder().start_delay(2 * SEC).build();
    let begun = Instant::now();
    let pool = start(config(8), &launcher).await;
    // Eight workers that take 2 s each are ready after 2 s, not 16.
    assert_eq!(begun.elapsed(), 2 * SEC);
    assert_eq!(pool.stats().gauges.workers_ready, 8);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn original_failing_scenario_all_ten_mixed_calls_succeed() {
    // 3 workers + 2 overflow, 2 s start, 5 s checkout timeout, 10 concurrent mixed calls.
    let launcher = FakeLauncher::builder()
        .start_delay(2 * SEC)
        .on("work", |_| FakeReply::ok(json!("done")).after(ms(500)))
        .build();
    let pool = start(config(3).max_overflow(2), &launcher).await;
    let calls = (0..10).map(|i| {
        let pool = pool.clone();
        async move {
            if i % 2 == 0 {
                pool.session(format!("mixed_session_{i}"))
                    .call("work", json!({}))
                    .await
            } else {
                pool.call("work", json!({})).await
            }
        }
    });
    let results = join_all(calls).await;
    for result in &results {
        assert_eq!(result.as_ref().expect("call succeeds").value, json!("done"));
    }
    assert_eq!(pool.stats().counters.calls_ok, 10);
    assert!(launcher.max_alive() <= 5);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn handler_error_is_structured_and_the_worker_lives_on() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1), &launcher).await;
    let err = pool
        .call("fail", json!({"message": "bad input"}))
        .await
        .unwrap_err();
    match &err {
        Error::Handler {
            context,
            error,
            worker,
        } => {
            assert_eq!(error.kind, "ValueError");
            assert_eq!(error.message, "bad input");
            assert!(error
                .traceback
                .as_deref()
                .unwrap_or("")
                .contains("Traceback"));
            assert_eq!(&*context.command, "fail");
            assert_eq!(worker, "w1");
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert_eq!(
        value(pool.call("add", json!({"a": 1, "b": 2}))).await,
        json!(3)
    );
    assert_eq!(launcher.launched(), 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn streamed_chunks_arrive_in_order_and_collect_into_a_list() {
    use futures::StreamExt;
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1), &launcher).await;
    let stream = pool
        .call_stream("stream", json!({"n": 1000}))
        .await
        .unwrap();
    let items: Vec<_> = stream.map(|item| item.unwrap().value).collect().await;
    assert_eq!(items, (0..1000).map(|i| json!(i)).collect::<Vec<_>>());
    let collected = pool.call("stream", json!({"n": 3})).await.unwrap();
    assert_eq!(collected.value, json!([0, 1, 2]));
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn many_pools_side_by_side_share_nothing() {
    let launcher = FakeLauncher::builder().build();
    let mut pools = Vec::new();
    for _ in 0..10 {
        pools.push(start(config(2).name("same-name"), &launcher).await);
    }
    let results = join_all(pools.iter().map(|p| p.call("add", json!({"a": 1, "b": 1})))).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap().value == json!(2)));
    assert_eq!(launcher.alive(), 20);
    for pool in &pools[..5] {
        pool.shutdown(SEC).await;
    }
    assert_eq!(launcher.alive(), 10);
    assert_eq!(
        pools[7]
            .call("add", json!({"a": 2, "b": 2}))
            .await
            .unwrap()
            .value,
        json!(4)
    );
    for pool in pools {
        pool.shutdown(SEC).await;
    }
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn dropping_the_pool_kills_every_worker() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(4), &launcher).await;
    assert_eq!(launcher.alive(), 4);
    drop(pool);
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn an_unknown_command_fails_at_once_with_the_known_ones_and_a_suggestion() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1), &launcher).await;
    let calls_before = launcher.calls_seen();
    let err = pool.call("ech", json!(null)).await.unwrap_err();
    match &err {
        Error::UnknownCommand {
            known, suggestion, ..
        } => {
            assert_eq!(suggestion.as_deref(), Some("echo"));
            assert!(known.iter().any(|c| c == "remember"), "{known:?}");
            assert_eq!(known, &pool.commands());
        }
        other => panic!("expected UnknownCommand, got {other:?}"),
    }
    assert!(err.to_string().contains("did you mean 'echo'"), "{err}");
    assert_eq!(err.kind(), pool_core::ErrorKind::InvalidRequest);
    assert!(!err.is_transient());
    // No worker was asked.
    assert_eq!(launcher.calls_seen(), calls_before);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn pool_start_validates_the_config() {
    let launcher = FakeLauncher::builder().build();
    let err = Pool::start(config(2).min_ready(3), launcher.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert_eq!(launcher.launched(), 0);
}

#[tokio::test(start_paused = true)]
async fn health_says_healthy_degraded_and_unavailable() {
    let launcher = FakeLauncher::builder()
        .on_start(|n| match n {
            0 | 1 => pool_testkit::StartBehavior::after(ms(0)),
            _ => pool_testkit::StartBehavior::FailLaunch("no more".into()),
        })
        .build();
    let pool = start(config(2), &launcher).await;
    tokio::time::sleep(SEC).await;
    let health = pool.health();
    assert_eq!(health.state, pool_core::HealthState::Healthy);
    assert_eq!((health.live_workers, health.wanted_workers), (2, 2));
    assert_eq!(health.uptime_ms, 1000);
    assert_eq!(pool.status().uptime_ms, 1000);
    pool.call("exit", json!({"code": 1})).await.unwrap_err();
    let health = pool.health();
    assert_eq!(health.state, pool_core::HealthState::Degraded);
    assert_eq!(health.live_workers, 1);
    pool.shutdown(SEC).await;
    assert_eq!(pool.health().state, pool_core::HealthState::Unavailable);
    launcher.assert_all_gone();
}
