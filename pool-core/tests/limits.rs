//! Nothing a caller or a worker sends may cost a healthy worker or unbounded memory: streams are
//! flow-controlled, collected replies are capped, oversized and malformed requests are refused
//! before anything is queued, and a deadline that passed is never dispatched.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use pool_core::{CallOptions, Error, ErrorKind, Payload};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn call_on_an_endless_stream_stops_at_max_reply_bytes_and_the_worker_lives() {
    let launcher = FakeLauncher::builder()
        .on("forever", |_| FakeReply::endless_stream())
        .build();
    let pool = start(config(1).max_reply_bytes(64 * 1024), &launcher).await;
    let worker = pool.status().workers[0].id.clone();
    let err = pool.call("forever", json!(null)).await.unwrap_err();
    match &err {
        Error::ReplyTooLarge { items, max, .. } => {
            assert_eq!(*max, 64 * 1024);
            assert!(*items > 0);
        }
        other => panic!("expected ReplyTooLarge, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert!(!err.is_transient());
    // Cancelled, not killed: the same worker serves the next call.
    assert_serving(&pool).await;
    let stats = pool.stats().counters;
    assert_eq!((stats.killed, stats.crashes, stats.cancels_sent), (0, 0, 1));
    assert_eq!(pool.status().workers[0].id, worker);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_nobody_reads_costs_no_more_than_its_window() {
    let launcher = FakeLauncher::builder()
        .on("forever", |_| FakeReply::endless_stream())
        .build();
    let window = 8;
    let pool = start(
        config(1).stream_window(window).call_timeout(60 * SEC),
        &launcher,
    )
    .await;
    let mut stream = pool.call_stream("forever", json!(null)).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().value, json!(0));
    // The consumer stops polling; time passes; the worker stays within the window.
    tokio::time::sleep(10 * SEC).await;
    assert!(
        launcher.items_sent() <= u64::from(window) + 1,
        "{} items sent",
        launcher.items_sent()
    );
    // Taking more lets it go on, in order.
    for expected in 1..=3 * window {
        let item = stream.next().await.unwrap().unwrap();
        assert_eq!(item.value, json!(expected));
    }
    drop(stream);
    assert_serving(&pool).await;
    assert_eq!(pool.stats().counters.killed, 0);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_floods_stream_items_is_dropped_with_bounded_memory() {
    let launcher = FakeLauncher::builder()
        .on("flood", |_| {
            FakeReply::endless_stream().ignoring_flow_control()
        })
        .build();
    let pool = start(config(1).stream_window(4), &launcher).await;
    let mut stream = pool.call_stream("flood", json!(null)).await.unwrap();
    let mut taken = 0;
    let err = loop {
        match stream.next().await {
            Some(Ok(_)) => taken += 1,
            Some(Err(err)) => break err,
            None => panic!("the flood ended"),
        }
    };
    // At most the window (and the two terminal slots) were ever held for it.
    assert!(taken <= 6, "{taken} items taken");
    match &err {
        Error::WorkerCrashed { exit, .. } => {
            assert!(exit.reason.contains("flow control"), "{err}")
        }
        other => panic!("expected the worker dropped, got {other:?}"),
    }
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_larger_than_max_frame_is_refused_before_it_is_queued() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!(1)).after(5 * SEC))
        .build();
    let pool = start(config(1).max_frame(1024 * 1024), &launcher).await;
    // Every worker is busy: a request that waited in the queue would take seconds to fail.
    let busy = spawn_call(&pool, "work", json!(null));
    until("busy", || pool.stats().gauges.workers_busy == 1).await;
    let seen = launcher.calls_seen();
    let asked = Instant::now();
    let err = pool
        .call("echo", Payload::from_bytes(vec![0u8; 2 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(asked.elapsed(), Duration::ZERO);
    match &err {
        Error::RequestTooLarge { size, max, .. } => {
            assert!(*size > 2 * 1024 * 1024);
            assert_eq!(*max, 1024 * 1024);
        }
        other => panic!("expected RequestTooLarge, got {other:?}"),
    }
    assert!(!err.is_transient());
    // Large JSON arguments too.
    let text = "x".repeat(300 * 1024);
    let err = pool
        .call("echo", json!({ "text": text }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RequestTooLarge { .. }), "{err}");
    assert_eq!(launcher.calls_seen(), seen);
    busy.await.unwrap().unwrap();
    assert_eq!(pool.stats().counters.killed, 0);
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn arguments_that_cannot_be_sent_fail_their_call_only() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1), &launcher).await;
    let seen = launcher.calls_seen();
    // A placeholder with no attachment behind it.
    let err = pool
        .call("echo", json!({"value": {"__pypool_att__": 3}}))
        .await
        .unwrap_err();
    match &err {
        Error::InvalidArguments { reason, .. } => {
            assert!(reason.contains("attachment 3"), "{reason}")
        }
        other => panic!("expected InvalidArguments, got {other:?}"),
    }
    // One that does refer to an attachment is fine.
    let mut args = Payload::new(json!({}));
    args.value["value"] = args.attach(Bytes::from_static(b"ok"));
    let reply = pool.call("echo", args).await.unwrap();
    assert_eq!(reply.as_bytes(), Some(&Bytes::from_static(b"ok")));
    // Values nested 1000 levels deep.
    let mut deep = json!(1);
    for _ in 0..1000 {
        deep = json!([deep]);
    }
    let err = pool
        .call("echo", json!({ "value": deep }))
        .await
        .unwrap_err();
    match &err {
        Error::InvalidArguments { reason, .. } => assert!(reason.contains("nest"), "{reason}"),
        other => panic!("expected InvalidArguments, got {other:?}"),
    }
    assert_eq!(launcher.calls_seen(), seen + 1);
    assert_eq!(pool.stats().counters.killed, 0);
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_deadline_passed_in_the_queue_is_never_dispatched() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!("done")).after(SEC))
        .build();
    let pool = start(config(1), &launcher).await;
    let busy = spawn_call(&pool, "work", json!(null));
    until("busy", || launcher.calls_seen() == 1).await;
    // Deadlines from well before to exactly when the worker frees up.
    let waiting: Vec<_> = (0..18u64)
        .map(|i| {
            let pool = pool.clone();
            let options = CallOptions::new().timeout(ms(500 + i * 30).min(SEC));
            tokio::spawn(async move { pool.call_with("echo", json!(i), options).await })
        })
        .collect();
    until("all queued", || pool.stats().gauges.waiters == 18).await;
    assert_eq!(busy.await.unwrap().unwrap().value, json!("done"));
    for task in waiting {
        let err = task.await.unwrap().unwrap_err();
        assert!(
            matches!(err, Error::Timeout { .. }),
            "a call past its deadline got {err:?}"
        );
    }
    // Only the first call ever reached the worker.
    assert_eq!(launcher.calls_seen(), 1);
    assert_eq!(pool.stats().counters.cancels_sent, 0);
    finish(pool, &launcher).await;
}
