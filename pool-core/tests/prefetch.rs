//! Prefetch: calls queued at busy workers so that a worker never waits for its next call. How
//! deep follows each worker's pace; every guarantee of a call holds for a queued one too.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use pool_core::{CallOptions, Error, WorkerState};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;

fn with_prefetch(size: usize) -> pool_core::PoolConfig {
    config(size).prefetch(64).prefetch_wait(ms(1))
}

#[tokio::test(start_paused = true)]
async fn a_worker_of_short_calls_gets_a_deep_queue_and_one_of_long_calls_none() {
    let launcher = FakeLauncher::builder()
        .on("quick", |_| FakeReply::ok(json!(1)))
        .on("slow", |_| FakeReply::ok(json!(1)).after(ms(50)))
        .build();
    let pool = start(with_prefetch(1), &launcher).await;
    // Before any reply the pool knows nothing of its pace: one call queued.
    assert_eq!(pool.status().workers[0].max_in_flight, 2);
    for _ in 0..20 {
        value(pool.call("quick", json!(null))).await;
    }
    // Calls that take no time at all (paused time): the whole prefetch.
    assert_eq!(pool.status().workers[0].max_in_flight, 1 + 64);
    for _ in 0..40 {
        value(pool.call("slow", json!(null))).await;
    }
    // 50 ms a call: nothing is worth queueing behind one.
    assert_eq!(pool.status().workers[0].max_in_flight, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_of_short_calls_running_a_long_one_takes_no_more_until_it_is_back() {
    let launcher = FakeLauncher::builder()
        .on("quick", |_| {
            FakeReply::ok(json!(1)).after(Duration::from_micros(10))
        })
        .on("slow", |_| FakeReply::ok(json!(1)).after(ms(50)))
        .build();
    let pool = start(with_prefetch(2), &launcher).await;
    for _ in 0..20 {
        value(pool.call("quick", json!(null))).await;
    }
    let deep = |pool: &pool_core::Pool| {
        let status = pool.status();
        status
            .workers
            .iter()
            .map(|w| w.max_in_flight)
            .collect::<Vec<_>>()
    };
    assert!(deep(&pool).iter().all(|&m| m > 1), "{:?}", deep(&pool));
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("slow", json!(null)).await })
    };
    // Once the long call has run longer than prefetch_wait, its worker takes nothing more: a
    // quick call waits in the pool's queue for whichever worker is free, not behind it.
    tokio::time::sleep(ms(5)).await;
    let status = pool.status();
    let busy: Vec<_> = status.workers.iter().filter(|w| w.in_flight == 1).collect();
    assert_eq!(busy.len(), 1, "{:?}", status.workers);
    assert_eq!(busy[0].max_in_flight, 1);
    assert_eq!(busy[0].state, WorkerState::Busy);
    // The other worker, idle, still takes a deep queue, and serves quick calls meanwhile.
    for _ in 0..10 {
        value(pool.call("quick", json!(null))).await;
    }
    assert!(
        !slow.is_finished(),
        "the quick calls waited for the long one"
    );
    slow.await.expect("joins").expect("slow call");
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn queued_calls_keep_fifo_order_across_callers() {
    let launcher = FakeLauncher::builder()
        .on("quick", |call| FakeReply::ok(call.args.clone()))
        .build();
    let pool = start(with_prefetch(1), &launcher).await;
    for _ in 0..10 {
        value(pool.call("quick", json!(null))).await;
    }
    let order = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let calls = (0..40).map(|i| {
        let pool = pool.clone();
        let order = order.clone();
        async move {
            value(pool.call("quick", json!(i))).await;
            order.lock().push(i);
        }
    });
    join_all(calls).await;
    assert_eq!(*order.lock(), (0..40).collect::<Vec<_>>());
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_whose_deadline_passes_is_cancelled_and_never_runs() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!("done")).after(SEC))
        .build();
    let pool = start(with_prefetch(1), &launcher).await;
    let running = spawn_call(&pool, "work", json!(null));
    until("running", || launcher.calls_started() == 1).await;
    // Queued at the worker behind the running call (one queued call before any reply).
    let queued = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.call_with("work", json!(null), CallOptions::new().timeout(ms(100)))
                .await
        })
    };
    until("sent to the worker", || launcher.calls_seen() == 2).await;
    let err = queued.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(running.await.unwrap().unwrap().value, json!("done"));
    // It was cancelled where it waited: it never ran, and the worker was not killed.
    assert_eq!(launcher.calls_started(), 1);
    let counters = pool.stats().counters;
    assert_eq!((counters.cancels_sent, counters.killed), (1, 0));
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn every_call_queued_at_a_worker_that_crashes_fails_with_the_crash() {
    let launcher = FakeLauncher::builder()
        .on("quick", |_| FakeReply::ok(json!(1)))
        .on("die", |_| FakeReply::crash(5).after(ms(10)))
        .build();
    let pool = start(with_prefetch(1), &launcher).await;
    for _ in 0..10 {
        value(pool.call("quick", json!(null))).await;
    }
    let dying = spawn_call(&pool, "die", json!(null));
    until("dying", || launcher.calls_started() == 11).await;
    let queued: Vec<_> = (0..5)
        .map(|_| spawn_call(&pool, "quick", json!(null)))
        .collect();
    assert!(matches!(
        dying.await.unwrap().unwrap_err(),
        Error::WorkerCrashed { .. }
    ));
    for call in queued {
        match call.await.unwrap() {
            Err(Error::WorkerCrashed { exit, .. }) => assert_eq!(exit.code(), Some(5)),
            other => panic!("a call queued at the crashed worker got {other:?}"),
        }
    }
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_strict_session_keeps_its_worker_with_prefetch() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(with_prefetch(2), &launcher).await;
    let session = pool.session_with("s", pool_core::Affinity::Strict);
    session
        .call("remember", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let recalls = (0..20).map(|_| session.call("recall", json!({"key": "k"})));
    for result in join_all(recalls).await {
        assert_eq!(result.unwrap().value, json!(1));
    }
    assert!(pool
        .status()
        .workers
        .iter()
        .all(|w| w.state != WorkerState::Draining));
    finish(pool, &launcher).await;
}
