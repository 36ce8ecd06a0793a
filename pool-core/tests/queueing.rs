//! Fair queueing, saturation, checkout timeouts, deadlines and dropped callers.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use pool_core::{CallOptions, Error, TimeoutKind};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let launcher = FakeLauncher::builder()
        .on("work", |call| {
            FakeReply::ok(call.args.clone()).after(ms(100))
        })
        .build();
    let pool = start(config(1), &launcher).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let caller = pool.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let reply = caller.call("work", json!(i)).await.unwrap();
            order.lock().unwrap().push(reply.value.as_i64().unwrap());
        }));
        // The first call takes the worker; each later one must be queued before the next starts.
        let expected_waiters = i;
        until("caller queued", || {
            pool.stats().gauges.waiters == expected_waiters
        })
        .await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    let stats = pool.stats();
    assert_eq!(stats.queue_wait.count, 20);
    // The 20th caller waited for 19 calls of 100 ms (HDR histograms keep 3 significant digits).
    assert_eq!(stats.queue_wait.max_us / 1000, 1_900);
    // Execution time excludes the queue: every call ran for 100 ms.
    assert_eq!(
        (stats.call_time.count, stats.call_time.max_us / 1000),
        (20, 100)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once_with_saturated() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(SEC))
        .build();
    let pool = start(config(1).max_waiters(2), &launcher).await;
    let busy = spawn_call(&pool, "work", json!(null));
    until("worker busy", || pool.stats().gauges.workers_busy == 1).await;
    let waiting: Vec<_> = (0..2)
        .map(|_| spawn_call(&pool, "work", json!(null)))
        .collect();
    until("two waiting", || pool.stats().gauges.waiters == 2).await;
    let before = Instant::now();
    let err = pool.call("work", json!(null)).await.unwrap_err();
    assert_eq!(before.elapsed(), ms(0));
    assert!(matches!(&err, Error::Saturated { waiters: 2, .. }), "{err}");
    assert!(err.to_string().contains("max_waiters"));
    busy.await.unwrap().unwrap();
    for task in waiting {
        task.await.unwrap().unwrap();
    }
    assert_eq!(pool.stats().counters.saturated, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn checkout_timeout_names_pool_session_command_and_wait() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(8 * SEC))
        .build();
    let pool = start(config(1).name("models"), &launcher).await;
    let busy = spawn_call(&pool, "work", json!(null));
    until("worker busy", || pool.stats().gauges.workers_busy == 1).await;
    let err = pool
        .session("user-7")
        .call("echo", json!(null))
        .await
        .unwrap_err();
    match &err {
        Error::Timeout {
            context,
            kind: TimeoutKind::Checkout,
            waited,
            worker: None,
        } => {
            assert_eq!(&*context.pool, "models");
            assert_eq!(context.session.as_deref(), Some("user-7"));
            assert_eq!(&*context.command, "echo");
            assert_eq!(*waited, 5 * SEC);
        }
        other => panic!("expected a checkout timeout, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("checkout_timeout") && text.contains("user-7") && text.contains("models"),
        "{text}"
    );
    assert_eq!(pool.stats().gauges.waiters, 0);
    busy.await.unwrap().unwrap();
    assert_eq!(pool.stats().counters.checkout_timeouts, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_deadline_tighter_than_the_timeouts_is_reported_as_the_deadline() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(2 * SEC))
        .build();
    let pool = start(config(1), &launcher).await;
    let err = pool
        .call_with("work", json!(null), CallOptions::new().timeout(ms(500)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Timeout {
                kind: TimeoutKind::Deadline,
                worker: Some(_),
                ..
            }
        ),
        "{err}"
    );
    // The cancelled worker confirmed and serves the next call.
    assert_serving(&pool).await;
    assert_eq!(launcher.launched(), 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_caller_dropped_while_queued_leaves_no_waiter_and_no_slot() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(SEC))
        .build();
    let pool = start(config(1), &launcher).await;
    let busy = spawn_call(&pool, "work", json!(null));
    until("worker busy", || pool.stats().gauges.workers_busy == 1).await;
    let queued = spawn_call(&pool, "work", json!(null));
    until("queued", || pool.stats().gauges.waiters == 1).await;
    queued.abort();
    until("dequeued", || pool.stats().gauges.waiters == 0).await;
    busy.await.unwrap().unwrap();
    let gauges = pool.stats().gauges;
    assert_eq!((gauges.calls_in_flight, gauges.workers_ready), (0, 1));
    assert_eq!(launcher.calls_seen(), 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_caller_dropped_mid_call_cancels_and_frees_the_worker() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(10 * SEC))
        .build();
    let pool = start(config(1), &launcher).await;
    let call = spawn_call(&pool, "work", json!(null));
    until("call running", || launcher.calls_seen() == 1).await;
    call.abort();
    until("slot free", || pool.stats().gauges.calls_in_flight == 0).await;
    let counters = pool.stats().counters;
    assert_eq!((counters.cancels_sent, counters.killed), (1, 0));
    let started = Instant::now();
    assert_eq!(
        value(pool.call("add", json!({"a": 2, "b": 3}))).await,
        json!(5)
    );
    assert_eq!(started.elapsed(), ms(0));
    assert_eq!(launcher.launched(), 1);
    finish(pool, &launcher).await;
}
