//! Overflow growth and retirement, recycling, and shutdown.

mod common;

use common::*;
use futures::future::join_all;
use pool_core::{Error, WorkerState};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn overflow_grows_under_load_and_retires_when_idle() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(SEC))
        .build();
    let pool = start(config(1).max_overflow(2).overflow_idle(10 * SEC), &launcher).await;
    let started = Instant::now();
    let results = join_all((0..3).map(|_| pool.call("work", json!(null)))).await;
    assert!(results.iter().all(Result::is_ok));
    // Three calls ran side by side on the permanent worker and two overflow workers.
    assert_eq!(started.elapsed(), SEC);
    assert_eq!(launcher.max_alive(), 3);
    let status = pool.status();
    assert_eq!(status.workers.iter().filter(|w| w.overflow).count(), 2);
    after_time("overflow retired", 12 * SEC, || launcher.alive() == 1).await;
    assert_eq!(pool.stats().counters.retired_overflow, 2);
    assert!(!pool.status().workers[0].overflow);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn the_pool_never_grows_past_size_plus_overflow() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(ms(100)))
        .build();
    let pool = start(config(2).max_overflow(3), &launcher).await;
    let results = join_all((0..200).map(|_| pool.call("work", json!(null)))).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(launcher.max_alive(), 5);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn recycling_starts_the_replacement_before_the_old_worker_stops() {
    // Starting takes a second; callers must never wait for it while a worker is recycled.
    let launcher = FakeLauncher::builder().start_delay(SEC).build();
    let pool = start(config(1).max_calls(3).max_calls_jitter(0), &launcher).await;
    for i in 0..3 {
        value(pool.call("echo", json!({"value": i}))).await;
    }
    assert_eq!(pool.status().workers[0].state, WorkerState::Recycling);
    // The due worker serves on while its replacement starts: no caller waits.
    let asked = Instant::now();
    assert_eq!(
        value(pool.call("echo", json!({"value": 3}))).await,
        json!(3)
    );
    assert_eq!(asked.elapsed(), ms(0));
    after_time("replaced", 3 * SEC, || {
        let workers = pool.status().workers;
        workers.len() == 1 && workers[0].id == "w2" && launcher.alive() == 1
    })
    .await;
    assert_eq!(pool.stats().counters.recycled, 1);
    // One process beyond `size` while the replacement started, never more.
    assert_eq!(launcher.max_alive(), 2);
    // The histogram's floor is 1 µs: nobody waited at all.
    assert_eq!(pool.stats().queue_wait.max_us, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn max_calls_jitter_draws_each_workers_limit_within_the_jitter() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).max_calls(10).max_calls_jitter(5), &launcher).await;
    let mut calls = 0;
    // `recycled` counts when the worker's last call is released, before its replacement starts.
    while pool.stats().counters.recycled == 0 {
        pool.call("echo", json!(1)).await.unwrap();
        calls += 1;
        assert!(calls <= 15, "worker not recycled within max_calls + jitter");
    }
    assert!(
        calls >= 10,
        "recycled after {calls} calls, before max_calls"
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn workers_are_recycled_after_max_age() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).max_age(60 * SEC).max_age_jitter(ms(0)), &launcher).await;
    pool.call("echo", json!(1)).await.unwrap();
    after_time("recycled by age", 62 * SEC, || {
        launcher.launched() == 2 && launcher.alive() == 1
    })
    .await;
    assert_eq!(pool.stats().counters.recycled, 1);
    assert_eq!(
        value(pool.call("echo", json!({"value": 2}))).await,
        json!(2)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn max_age_jitter_spreads_recycling_and_capacity_never_drops() {
    // Four workers started together, each recycled at 60 s plus up to 30 s.
    let launcher = FakeLauncher::builder().start_delay(SEC).build();
    let pool = start(
        config(4).max_age(60 * SEC).max_age_jitter(30 * SEC),
        &launcher,
    )
    .await;
    let mut recycled_at = Vec::new();
    let mut last = 0;
    let mut tick = tokio::time::interval(ms(100));
    while launcher.launched() < 8 || launcher.alive() > 4 {
        tick.tick().await;
        let ready = pool.stats().gauges;
        assert!(
            ready.workers_ready + ready.workers_busy >= 4,
            "capacity dropped: {ready:?}"
        );
        let recycled = pool.stats().counters.recycled;
        for _ in last..recycled {
            recycled_at.push(Instant::now());
        }
        last = recycled;
        assert!(recycled_at.len() <= 4);
    }
    assert_eq!(recycled_at.len(), 4, "each worker recycled once");
    recycled_at.dedup();
    assert!(
        recycled_at.len() > 1,
        "all four workers were recycled at the same moment"
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn workers_are_recycled_above_max_rss() {
    // Fake workers report 10 MiB; maintenance samples it.
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).max_rss(5 * 1024 * 1024), &launcher).await;
    pool.call("echo", json!(1)).await.unwrap();
    after_time("replaced", 3 * SEC, || launcher.launched() >= 2).await;
    assert!(pool.stats().counters.recycled >= 1);
    assert_eq!(
        value(pool.call("echo", json!({"value": 2}))).await,
        json!(2)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_calls_finish_and_fails_waiters() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!("finished")).after(2 * SEC))
        .build();
    let pool = start(config(1), &launcher).await;
    let running = spawn_call(&pool, "work", json!(null));
    until("running", || launcher.calls_seen() == 1).await;
    let waiting: Vec<_> = (0..3)
        .map(|_| spawn_call(&pool, "work", json!(null)))
        .collect();
    until("waiting", || pool.stats().gauges.waiters == 3).await;
    let stopped = Instant::now();
    pool.shutdown(10 * SEC).await;
    assert_eq!(stopped.elapsed(), 2 * SEC);
    assert_eq!(running.await.unwrap().unwrap().value, json!("finished"));
    for task in waiting {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::ShuttingDown { .. }), "{err}");
    }
    let err = pool.call("work", json!(null)).await.unwrap_err();
    assert!(matches!(err, Error::ShuttingDown { .. }), "{err}");
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn shutdown_grace_bounds_the_wait_for_calls_in_flight() {
    let launcher = FakeLauncher::builder()
        .on("hang", |_| FakeReply::hang())
        .build();
    let pool = start(config(2).call_timeout(600 * SEC), &launcher).await;
    let running = spawn_call(&pool, "hang", json!(null));
    until("running", || launcher.calls_seen() == 1).await;
    let stopped = Instant::now();
    pool.shutdown(3 * SEC).await;
    // 3 s grace, then SHUTDOWN is ignored by the hung worker for stop_grace (2 s): SIGTERM ends it.
    assert_eq!(stopped.elapsed(), 5 * SEC);
    // The pool stopped the worker: its caller learns that, not of a crash, and not to retry.
    let err = running.await.unwrap().unwrap_err();
    match &err {
        Error::ShuttingDown { context } => assert_eq!(&*context.command, "hang"),
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
    assert!(!err.is_transient());
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn shutdown_twice_is_harmless() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2), &launcher).await;
    pool.shutdown(SEC).await;
    pool.shutdown(SEC).await;
    launcher.assert_all_gone();
    assert!(pool.status().shutting_down);
}

#[tokio::test(start_paused = true)]
async fn recycling_waits_for_the_strict_sessions_of_a_worker() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).max_calls(3).max_calls_jitter(0), &launcher).await;
    let session = pool.session_with("s", pool_core::Affinity::Strict);
    session
        .call("remember", json!({"key": "k", "value": "v"}))
        .await
        .unwrap();
    // Far past max_calls: the worker is due, but it holds the session's state.
    for _ in 0..6 {
        let value = session.call("recall", json!({"key": "k"})).await.unwrap();
        assert_eq!(value.value, json!("v"));
    }
    tokio::time::sleep(5 * SEC).await;
    assert_eq!(pool.status().workers[0].id, "w1");
    // Its replacement is up meanwhile; once the session ends, the old worker goes.
    session.end().await;
    after_time("recycled", 5 * SEC, || {
        let workers = pool.status().workers;
        workers.len() == 1 && workers[0].id != "w1"
    })
    .await;
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn max_age_recycles_even_a_worker_with_a_strict_session() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).max_age(60 * SEC).max_age_jitter(ms(0)), &launcher).await;
    let session = pool.session_with("s", pool_core::Affinity::Strict);
    session
        .call("remember", json!({"key": "k", "value": "v"}))
        .await
        .unwrap();
    after_time("recycled by age", 70 * SEC, || {
        launcher.launched() == 2 && launcher.alive() == 1
    })
    .await;
    let err = session
        .call("recall", json!({"key": "k"}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SessionWorkerLost { .. }), "{err}");
    // Restarting the session is the documented way on.
    let session = session.restart().await;
    assert_eq!(
        session
            .call("recall", json!({"key": "k"}))
            .await
            .unwrap()
            .value,
        json!(null)
    );
    finish(pool, &launcher).await;
}
