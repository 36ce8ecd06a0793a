//! Hung, crashed, garbage-speaking and unreachable workers; the circuit breaker; failed starts.

mod common;

use common::*;
use pool_core::{BreakerState, Error, Pool, TimeoutKind};
use pool_testkit::{FakeLauncher, FakeReply, StartBehavior};
use serde_json::json;
use std::time::Duration;

use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn a_hung_call_times_out_then_the_worker_is_killed_and_replaced() {
    let launcher = FakeLauncher::builder()
        .on("hang", |_| FakeReply::hang())
        .build();
    let pool = start(config(1).call_timeout(2 * SEC).cancel_grace(SEC), &launcher).await;
    let started = Instant::now();
    let err = pool.call("hang", json!(null)).await.unwrap_err();
    assert_eq!(started.elapsed(), 2 * SEC);
    assert!(
        matches!(&err, Error::Timeout { kind: TimeoutKind::Call, worker: Some(w), .. } if w == "w1"),
        "{err}"
    );
    // The next call waits out the grace period, then runs on the replacement, never on w1.
    let reply = pool.call("echo", json!({"value": "next"})).await.unwrap();
    assert_eq!(reply.value, json!("next"));
    let status = pool.status();
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].id, "w2");
    let counters = pool.stats().counters;
    assert_eq!(
        (counters.killed, counters.crashes, counters.call_timeouts),
        (1, 0, 1)
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_late_reply_is_dropped_and_counted_never_given_to_the_next_caller() {
    // Replies "stale" 1.5 s after the call; the caller gives up at 1 s; the worker answers within
    // the 1 s grace, so it is kept, and its stale reply must not reach the next caller.
    let launcher = FakeLauncher::builder()
        .on("slow", |_| {
            FakeReply::ok(json!("stale"))
                .after(ms(1500))
                .ignoring_cancel()
        })
        .build();
    let pool = start(config(1).call_timeout(SEC).cancel_grace(SEC), &launcher).await;
    let err = pool.call("slow", json!(null)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                kind: TimeoutKind::Call,
                ..
            }
        ),
        "{err}"
    );
    let reply = pool.call("echo", json!({"value": "fresh"})).await.unwrap();
    assert_eq!(reply.value, json!("fresh"));
    let counters = pool.stats().counters;
    assert_eq!(counters.late_replies_dropped, 1);
    assert_eq!(counters.killed, 0);
    assert_eq!(launcher.launched(), 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_mid_call_is_a_typed_error_with_exit_code_and_stderr() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2), &launcher).await;
    let err = pool.call("exit", json!({"code": 3})).await.unwrap_err();
    match &err {
        Error::WorkerCrashed { exit, context } => {
            assert_eq!(exit.exit.and_then(|e| e.code), Some(3));
            assert!(
                exit.stderr_tail.iter().any(|l| l.contains("code 3")),
                "{:?}",
                exit.stderr_tail
            );
            assert_eq!(&*context.command, "exit");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    assert!(err.to_string().contains("exit code 3"), "{err}");
    // It died within stable_uptime of its start: its replacement waits out a backoff.
    after_time("replacement ready", SEC, || {
        pool.stats().gauges.workers_ready == 2
    })
    .await;
    assert_eq!(pool.stats().counters.crashes, 1);
    assert_eq!(launcher.launched(), 3);
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_garbage_frame_drops_the_worker_and_fails_its_call() {
    let launcher = FakeLauncher::builder()
        .on("bad", |_| FakeReply::garbage())
        .build();
    let pool = start(config(1), &launcher).await;
    let err = pool.call("bad", json!(null)).await.unwrap_err();
    match &err {
        Error::WorkerCrashed { exit, .. } => {
            assert!(exit.reason.contains("bad frame"), "{}", exit.reason)
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_worker_that_misses_pings_is_killed_and_replaced() {
    let launcher = FakeLauncher::builder()
        .answer_pings(|worker| worker != 0)
        .build();
    let config = config(1).ping_interval(SEC).ping_timeout(SEC).max_missed(3);
    let pool = start(config, &launcher).await;
    tokio::time::sleep(10 * SEC).await;
    let counters = pool.stats().counters;
    assert_eq!((counters.pings_missed, counters.killed), (3, 1));
    assert_eq!(pool.status().workers[0].id, "w2");
    assert_eq!(pool.status().workers[0].missed_pings, 0);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_fails_fast_half_opens_and_closes() {
    // Launch 0 works; 1..=4 fail; 5 works.
    let launcher = FakeLauncher::builder()
        .on_start(|n| match n {
            1..=4 => StartBehavior::FailLaunch(format!("spawn failed #{n}")),
            _ => StartBehavior::after(ms(0)),
        })
        .build();
    // Only failed launches count here (a crash right after start would count as well).
    let config = config(1)
        .breaker_threshold(3)
        .breaker_cooldown(5 * SEC)
        .restart_backoff(ms(100))
        .stable_uptime(Duration::ZERO);
    let pool = start(config, &launcher).await;
    let _ = pool.call("exit", json!({"code": 1})).await.unwrap_err();
    // Replacement attempts at 0, +100 ms, +200 ms fail: the breaker opens.
    after_time("breaker open", SEC, || {
        pool.status().breaker == BreakerState::Open
    })
    .await;
    let opened = Instant::now();
    let err = pool.call("echo", json!(1)).await.unwrap_err();
    assert_eq!(opened.elapsed(), ms(0));
    match &err {
        Error::CircuitOpen {
            failures,
            last_error,
            ..
        } => {
            assert_eq!(*failures, 3);
            assert!(last_error.contains("spawn failed #3"), "{last_error}");
        }
        other => panic!("expected circuit open, got {other:?}"),
    }
    // After the cooldown one trial launch (#4) fails: open again.
    after_time("trial failed", 6 * SEC, || {
        pool.status().launch_failures_in_a_row == 4
    })
    .await;
    assert_eq!(pool.status().breaker, BreakerState::Open);
    // The next trial (#5) succeeds: closed, and calls work again.
    after_time("breaker closed", 6 * SEC, || {
        pool.status().breaker == BreakerState::Closed
    })
    .await;
    assert_eq!(launcher.launched(), 6);
    assert_eq!(
        value(pool.call("echo", json!({"value": 2}))).await,
        json!(2)
    );
    assert_eq!(pool.stats().counters.circuit_rejections, 1);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn start_fails_fast_with_the_import_error_and_leaves_nothing() {
    let launcher = FakeLauncher::builder()
        .on_start(|_| StartBehavior::StartupError("No module named 'missing_dependency'".into()))
        .build();
    let started = Instant::now();
    let err = Pool::start(config(4), launcher.clone()).await.unwrap_err();
    assert_eq!(started.elapsed(), ms(0));
    match &err {
        Error::StartFailed {
            ready,
            wanted,
            reason,
            ..
        } => {
            assert_eq!((*ready, *wanted), (0, 4));
            assert!(reason.contains("missing_dependency"), "{reason}");
            assert!(reason.contains("ImportError"), "{reason}");
        }
        other => panic!("expected start failure, got {other:?}"),
    }
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn start_fails_when_launches_keep_failing() {
    let launcher = FakeLauncher::builder()
        .on_start(|_| StartBehavior::ExitBeforeHello("Fatal Python error: init failed".into()))
        .build();
    let err = Pool::start(config(2).breaker_threshold(4), launcher.clone())
        .await
        .unwrap_err();
    match &err {
        Error::StartFailed { reason, .. } => {
            assert!(reason.contains("4 launches failed"), "{reason}");
            assert!(reason.contains("Fatal Python error"), "{reason}");
        }
        other => panic!("expected start failure, got {other:?}"),
    }
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn start_fails_after_start_timeout_when_workers_never_say_hello() {
    let launcher = FakeLauncher::builder()
        .on_start(|_| StartBehavior::Hang)
        .build();
    let config = config(2)
        .start_timeout(10 * SEC)
        .handshake_timeout(60 * SEC);
    let started = Instant::now();
    let err = Pool::start(config, launcher.clone()).await.unwrap_err();
    assert_eq!(started.elapsed(), 10 * SEC);
    assert!(err.to_string().contains("start_timeout"), "{err}");
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn min_ready_lets_the_pool_start_before_slow_workers() {
    let launcher = FakeLauncher::builder()
        .on_start(|n| StartBehavior::after(if n == 0 { ms(100) } else { 10 * SEC }))
        .build();
    let started = Instant::now();
    let pool = start(config(3).min_ready(1), &launcher).await;
    assert_eq!(started.elapsed(), ms(100));
    assert_eq!(pool.stats().gauges.workers_starting, 2);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_local_worker_is_bounded_by_its_call_not_by_pings() {
    // A handler holding the GIL cannot answer pings; a local worker's death shows as its exit.
    let launcher = FakeLauncher::builder()
        .answer_pings(|_| false)
        .on("slow", |_| FakeReply::ok(json!("done")).after(20 * SEC))
        .build();
    let config = config(1)
        .call_timeout(60 * SEC)
        .ping_interval(SEC)
        .ping_timeout(SEC)
        .max_missed(2);
    let pool = start(config, &launcher).await;
    assert_eq!(value(pool.call("slow", json!(null))).await, json!("done"));
    assert_eq!(pool.stats().counters.killed, 0);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_remote_worker_that_answers_pings_keeps_its_long_call() {
    let launcher = FakeLauncher::builder()
        .remote(true)
        .on("slow", |_| FakeReply::ok(json!("done")).after(20 * SEC))
        .build();
    let config = config(1)
        .call_timeout(60 * SEC)
        .ping_interval(SEC)
        .ping_timeout(SEC)
        .max_missed(2);
    let pool = start(config, &launcher).await;
    assert_eq!(value(pool.call("slow", json!(null))).await, json!("done"));
    let counters = pool.stats().counters;
    assert_eq!((counters.killed, counters.pings_missed), (0, 0));
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_remote_worker_that_goes_silent_fails_its_call_within_the_ping_budget() {
    // A remote worker has no process the pool can watch: silence is the only sign it is gone.
    let launcher = FakeLauncher::builder()
        .remote(true)
        .on("hang", |_| FakeReply::hang())
        .build();
    let config = config(1)
        .call_timeout(600 * SEC)
        .ping_interval(SEC)
        .ping_timeout(SEC)
        .max_missed(2);
    let budget = config.ping_interval
        + config.maintenance_interval
        + config.max_missed
            * (config.ping_timeout + config.ping_interval + config.maintenance_interval);
    let pool = start(config, &launcher).await;
    let started = Instant::now();
    let err = pool.call("hang", json!(null)).await.unwrap_err();
    assert!(
        started.elapsed() <= budget,
        "{:?} > {budget:?}",
        started.elapsed()
    );
    match &err {
        Error::WorkerCrashed { exit, .. } => {
            assert!(exit.reason.contains("missed 2 pings"), "{err}");
            assert_eq!(exit.exit, None, "a remote worker has no exit status");
        }
        other => panic!("expected WorkerCrashed, got {other}"),
    }
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn workers_that_die_right_after_their_start_cannot_make_the_pool_spin() {
    // Every worker but the first dies the moment its handshake is done.
    let launcher = FakeLauncher::builder()
        .on_start(|n| match n {
            0 => StartBehavior::after(ms(0)),
            _ => StartBehavior::CrashAfterHello(7),
        })
        .build();
    let config = config(1)
        .restart_backoff(ms(100))
        .restart_backoff_max(5 * SEC)
        .breaker_threshold(5)
        .breaker_cooldown(5 * SEC);
    let pool = start(config, &launcher).await;
    let _ = pool.call("exit", json!({"code": 1})).await.unwrap_err();
    tokio::time::sleep(60 * SEC).await;
    // Without backoff and breaker this was ~17 launches a second (1,000 a minute).
    let launches = launcher.launched();
    assert!(launches <= 16, "{launches} launches in a minute");
    let status = pool.status();
    assert_ne!(status.breaker, BreakerState::Closed);
    let reason = status.last_launch_error.unwrap_or_default();
    assert!(reason.contains("exit code 7"), "{reason}");
    assert!(
        reason.contains("crashing right after its start"),
        "{reason}"
    );
    // Calls fail fast with that reason while no worker lives.
    let err = pool.call("echo", json!(1)).await.unwrap_err();
    match &err {
        Error::CircuitOpen { last_error, .. } => assert!(last_error.contains("exit code 7")),
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_every_call_crashes_is_relaunched_with_backoff() {
    let launcher = FakeLauncher::builder().build();
    let config = config(1)
        .restart_backoff(ms(100))
        .restart_backoff_max(5 * SEC)
        .breaker_threshold(5)
        .breaker_cooldown(5 * SEC)
        .checkout_timeout(SEC);
    let pool = start(config, &launcher).await;
    let started = Instant::now();
    while started.elapsed() < 60 * SEC {
        // Every call kills its worker moments after it started; a caller tries every 10 ms.
        let _ = pool.call("exit", json!({"code": 1})).await;
        tokio::time::sleep(ms(10)).await;
    }
    // Without counting these deaths it was ~64 launches a second.
    let launches = launcher.launched();
    assert!(launches <= 20, "{launches} launches in a minute");
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_lives_past_stable_uptime_forgives_earlier_failures() {
    let launcher = FakeLauncher::builder()
        .on_start(|n| match n {
            1 | 2 => StartBehavior::FailLaunch(format!("spawn failed #{n}")),
            _ => StartBehavior::after(ms(0)),
        })
        .build();
    let pool = start(config(1).stable_uptime(10 * SEC), &launcher).await;
    let _ = pool.call("exit", json!({"code": 1})).await.unwrap_err();
    after_time("replaced", 5 * SEC, || pool.status().workers.len() == 1).await;
    assert!(pool.status().launch_failures_in_a_row >= 2);
    tokio::time::sleep(12 * SEC).await;
    assert_eq!(pool.status().launch_failures_in_a_row, 0);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_breaks_the_protocol_before_hello_is_killed_at_once() {
    // It sends garbage, then would live on: nothing to wait for.
    let launcher = FakeLauncher::builder()
        .on_start(|_| StartBehavior::GarbageThenHang)
        .build();
    let config = config(1)
        .breaker_threshold(5)
        .restart_backoff(ms(100))
        .restart_backoff_max(5 * SEC);
    let started = Instant::now();
    let err = Pool::start(config, launcher.clone()).await.unwrap_err();
    assert!(matches!(err, Error::StartFailed { .. }), "{err}");
    // Five attempts with 100 + 200 + 400 + 800 ms of backoff between them, and no grace.
    assert!(
        started.elapsed() <= ms(1500),
        "start failed only after {:?}",
        started.elapsed()
    );
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_never_says_hello_is_killed_at_its_handshake_timeout() {
    let launcher = FakeLauncher::builder()
        .on_start(|_| StartBehavior::Hang)
        .build();
    let config = config(1)
        .handshake_timeout(ms(800))
        .breaker_threshold(5)
        .restart_backoff(ms(100))
        .restart_backoff_max(5 * SEC);
    let started = Instant::now();
    let err = Pool::start(config, launcher.clone()).await.unwrap_err();
    assert!(matches!(err, Error::StartFailed { .. }), "{err}");
    // 5 × 0.8 s handshakes and 1.5 s of backoff; each kill is immediate.
    assert!(
        started.elapsed() <= ms(5 * 800 + 1500),
        "start failed only after {:?}",
        started.elapsed()
    );
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn a_caller_waiting_through_a_failed_overflow_launch_is_served_by_the_next() {
    // No permanent workers: every worker is an overflow worker, and the first launch fails.
    let launcher = FakeLauncher::builder()
        .on_start(|n| match n {
            0 => StartBehavior::FailLaunch("spawn failed".into()),
            _ => StartBehavior::after(ms(0)),
        })
        .build();
    let config = config(0)
        .max_overflow(1)
        .min_ready(0)
        .restart_backoff(ms(100))
        .checkout_timeout(30 * SEC);
    let pool = start(config, &launcher).await;
    let asked = Instant::now();
    assert_eq!(
        value(pool.call("echo", json!({"value": 5}))).await,
        json!(5)
    );
    // Served after the backoff, not after the checkout timeout.
    assert_eq!(asked.elapsed(), ms(100));
    finish(pool, &launcher).await;
}
