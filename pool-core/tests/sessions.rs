//! Session registry, TTL and the three affinity modes.

mod common;

use common::*;
use pool_core::{Affinity, Error};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;

#[tokio::test(start_paused = true)]
async fn sessions_are_tracked_with_calls_errors_and_last_worker() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2), &launcher).await;
    let session = pool.session("user-7");
    session.call("echo", json!(1)).await.unwrap();
    session
        .call("fail", json!({"message": "x"}))
        .await
        .unwrap_err();
    let status = pool.status();
    let entry = status.sessions.iter().find(|s| s.id == "user-7").unwrap();
    assert_eq!(
        (entry.calls, entry.errors, entry.affinity),
        (2, 1, Affinity::None)
    );
    assert!(entry.last_worker.is_some());
    assert_eq!(pool.stats().gauges.sessions, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn strict_affinity_keeps_state_on_one_worker_and_end_drops_it() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(4), &launcher).await;
    let session = pool.session_with("cart-1", Affinity::Strict);
    session
        .call("remember", json!({"key": "item", "value": "book"}))
        .await
        .unwrap();
    for _ in 0..10 {
        // Other traffic moves around; the session's calls stay with its state.
        pool.call("echo", json!(1)).await.unwrap();
        let value = value(session.call("recall", json!({"key": "item"}))).await;
        assert_eq!(value, json!("book"));
    }
    session.end().await;
    let err = session
        .call("recall", json!({"key": "item"}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SessionEnded { .. }), "{err}");
    until("session end delivered", || {
        launcher.session_ends().len() == 1
    })
    .await;
    assert_eq!(launcher.session_ends()[0].1, "cart-1");
    assert_eq!(pool.stats().gauges.sessions, 0);
    // A new handle with the same id starts afresh.
    let fresh = pool.session_with("cart-1", Affinity::Strict);
    assert_eq!(
        value(fresh.call("recall", json!({"key": "item"}))).await,
        json!(null)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn strict_session_whose_worker_died_fails_with_session_worker_lost() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2), &launcher).await;
    let session = pool.session_with("s", Affinity::Strict);
    session
        .call("remember", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let err = session.call("exit", json!({"code": 9})).await.unwrap_err();
    assert!(matches!(err, Error::WorkerCrashed { .. }), "{err}");
    let err = session
        .call("recall", json!({"key": "k"}))
        .await
        .unwrap_err();
    match &err {
        Error::SessionWorkerLost { context, .. } => {
            assert_eq!(context.session.as_deref(), Some("s"))
        }
        other => panic!("expected SessionWorkerLost, got {other:?}"),
    }
    // The rest of the pool is unaffected.
    pool.call("echo", json!(1)).await.unwrap();
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn strict_waiters_fail_when_their_worker_dies_while_they_wait() {
    let launcher = FakeLauncher::builder()
        .on("die_later", |_| FakeReply::crash(4).after(SEC))
        .build();
    let pool = start(config(2), &launcher).await;
    let session = pool.session_with("s", Affinity::Strict);
    session
        .call("remember", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let first = tokio::spawn({
        let session = session.clone();
        async move { session.call("die_later", json!(null)).await }
    });
    until("first running", || launcher.calls_seen() == 2).await;
    let second = tokio::spawn({
        let session = session.clone();
        async move { session.call("recall", json!({"key": "k"})).await }
    });
    until("second waiting", || pool.stats().gauges.waiters == 1).await;
    assert!(matches!(
        first.await.unwrap().unwrap_err(),
        Error::WorkerCrashed { .. }
    ));
    let err = second.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::SessionWorkerLost { .. }), "{err}");
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn prefer_affinity_uses_the_last_worker_when_free_and_another_when_not() {
    let launcher = FakeLauncher::builder()
        .on("work", |call| FakeReply::ok(json!(call.worker)).after(SEC))
        .build();
    let pool = start(config(3), &launcher).await;
    let session = pool.session_with("p", Affinity::Prefer);
    let first = value(session.call("pid", json!(null))).await;
    for _ in 0..5 {
        assert_eq!(value(session.call("pid", json!(null))).await, first);
    }
    // Occupy the preferred worker through the session itself; the next call goes elsewhere.
    let busy = tokio::spawn({
        let session = session.clone();
        async move { session.call("work", json!(null)).await }
    });
    until("busy", || pool.stats().gauges.calls_in_flight == 1).await;
    let other = value(session.call("pid", json!(null))).await;
    assert_ne!(other, first);
    busy.await.unwrap().unwrap();
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_expire_after_their_ttl_and_workers_are_told() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).session_ttl(60 * SEC), &launcher).await;
    let session = pool.session_with("short", Affinity::Strict);
    session
        .call("remember", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    after_time("expired", 62 * SEC, || pool.stats().gauges.sessions == 0).await;
    assert_eq!(pool.stats().counters.sessions_expired, 1);
    until("session end delivered", || {
        launcher.session_ends().len() == 1
    })
    .await;
    // Calling it again starts afresh: the state is gone.
    assert_eq!(
        value(session.call("recall", json!({"key": "k"}))).await,
        json!(null)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_session_in_use_does_not_expire() {
    let launcher = FakeLauncher::builder()
        .on("long", |_| FakeReply::ok(json!(1)).after(90 * SEC))
        .build();
    let pool = start(
        config(1).session_ttl(60 * SEC).call_timeout(120 * SEC),
        &launcher,
    )
    .await;
    let session = pool.session("busy");
    session.call("long", json!(null)).await.unwrap();
    assert_eq!(pool.stats().counters.sessions_expired, 0);
    assert_eq!(pool.status().sessions[0].calls, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_call_on_an_ended_handle_does_not_touch_the_new_session_of_the_same_id() {
    let launcher = FakeLauncher::builder()
        .on("long", |_| FakeReply::ok(json!("done")).after(90 * SEC))
        .build();
    let pool = start(
        config(2).session_ttl(60 * SEC).call_timeout(120 * SEC),
        &launcher,
    )
    .await;
    let old = pool.session("s");
    old.call("echo", json!(1)).await.unwrap();
    old.end().await;
    let new = pool.session("s");
    let long = tokio::spawn({
        let new = new.clone();
        async move { new.call("long", json!(null)).await }
    });
    until("long call running", || launcher.calls_seen() == 2).await;
    let err = old.call("echo", json!(1)).await.unwrap_err();
    assert!(matches!(err, Error::SessionEnded { .. }), "{err}");
    // The new session is busy for 90 s, longer than its TTL: it must not expire meanwhile.
    assert_eq!(long.await.unwrap().unwrap().value, json!("done"));
    assert_eq!(pool.stats().counters.sessions_expired, 0);
    assert_eq!(pool.status().sessions[0].calls, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn strict_no_wait_fails_at_once_when_the_sessions_worker_is_busy() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!("done")).after(SEC))
        .build();
    let pool = start(config(2), &launcher).await;
    let session = pool.session_with("s", Affinity::StrictNoWait);
    session.call("echo", json!(1)).await.unwrap();
    let bound = pool.status().sessions[0].last_worker.clone();
    let running = tokio::spawn(session.call("work", json!(null)));
    until("busy", || pool.stats().gauges.workers_busy == 1).await;
    let asked = tokio::time::Instant::now();
    let err = session.call("echo", json!(2)).await.unwrap_err();
    assert_eq!(asked.elapsed(), ms(0));
    match &err {
        Error::WorkerBusy { worker, context } => {
            assert_eq!(Some(worker.clone()), bound);
            assert_eq!(context.session.as_deref(), Some("s"));
        }
        other => panic!("expected WorkerBusy, got {other:?}"),
    }
    assert!(err.is_transient());
    assert_eq!(running.await.unwrap().unwrap().value, json!("done"));
    // Free again: served.
    assert_eq!(
        session.call("echo", json!(3)).await.unwrap().value,
        json!(3)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn max_sessions_refuses_one_more_session() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(1).max_sessions(2), &launcher).await;
    pool.session("a").call("echo", json!(1)).await.unwrap();
    pool.session("b").call("echo", json!(1)).await.unwrap();
    let err = pool.session("c").call("echo", json!(1)).await.unwrap_err();
    assert!(
        matches!(err, Error::TooManySessions { max: 2, .. }),
        "{err}"
    );
    // Existing sessions go on; ending one makes room.
    pool.session("a").call("echo", json!(2)).await.unwrap();
    pool.session("b").end().await;
    pool.session("c").call("echo", json!(1)).await.unwrap();
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn expiry_ending_and_lost_workers_are_announced() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2).session_ttl(10 * SEC), &launcher).await;
    let mut events = pool.session_events();
    pool.session("idle").call("echo", json!(1)).await.unwrap();
    let strict = pool.session_with("strict", Affinity::Strict);
    strict.call("echo", json!(1)).await.unwrap();
    strict.call("exit", json!({"code": 3})).await.unwrap_err();
    let lost = events.recv().await.unwrap();
    assert!(
        matches!(&lost, pool_core::SessionEvent::WorkerLost { session, .. } if session == "strict"),
        "{lost:?}"
    );
    strict.end().await;
    assert_eq!(
        events.recv().await.unwrap(),
        pool_core::SessionEvent::Ended {
            session: "strict".into()
        }
    );
    let expired = tokio::time::timeout(20 * SEC, events.recv())
        .await
        .expect("expiry announced")
        .unwrap();
    assert_eq!(
        expired,
        pool_core::SessionEvent::Expired {
            session: "idle".into()
        }
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn ending_a_session_fails_its_queued_calls_and_stays_ended_for_its_handles() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| FakeReply::ok(json!("done")).after(SEC))
        .build();
    let pool = start(config(1), &launcher).await;
    let session = pool.session_with("s", Affinity::Strict);
    let running = tokio::spawn(session.call("work", json!(null)));
    until("running", || launcher.calls_seen() == 1).await;
    let queued = tokio::spawn(session.call("echo", json!(1)));
    until("queued", || pool.stats().gauges.waiters == 1).await;
    session.end().await;
    let err = queued.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::SessionEnded { .. }), "{err}");
    // A clone of the ended handle cannot bring the session back.
    let clone = session.clone();
    let err = clone.call("echo", json!(2)).await.unwrap_err();
    assert!(matches!(err, Error::SessionEnded { .. }), "{err}");
    running.await.unwrap().unwrap();
    assert!(pool.status().sessions.is_empty());
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_temporary_session_handle_can_be_collected_and_awaited_later() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2), &launcher).await;
    let calls: Vec<_> = (0..4)
        .map(|i| {
            pool.session(format!("user-{i}"))
                .call("echo", json!({ "value": i }))
        })
        .collect();
    let results = futures::future::join_all(calls).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap().value, json!(i));
    }
    finish(pool, &launcher).await;
}
