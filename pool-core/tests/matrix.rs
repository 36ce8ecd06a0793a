//! The fault matrix, in the spirit of deadpool's: every combination of start behaviour, call
//! behaviour and caller behaviour. Whatever happens, the pool never runs more workers than
//! `size + max_overflow`, never loses a worker or a slot, and keeps serving — with and without
//! calls prefetched (queued at busy workers).

mod common;

use common::*;
use futures::future::join_all;
use pool_core::{CallOptions, Error, Pool, TimeoutKind};
use pool_testkit::{FakeLauncher, FakeReply, StartBehavior};
use serde_json::json;

#[derive(Debug, Clone, Copy)]
enum Start {
    Instant,
    Slow,
    FirstLaunchFails,
    FirstStartHangs,
    FirstStartupError,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CallKind {
    Ok,
    TooSlow,
    SlowIgnoringCancel,
    Error,
    Crash,
    Hang,
    Garbage,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Caller {
    Awaits,
    DropsWhileQueued,
    DropsMidCall,
    ShortDeadline,
}

const SIZE: usize = 2;
const OVERFLOW: usize = 1;

fn launcher(start: Start, call: CallKind) -> std::sync::Arc<FakeLauncher> {
    FakeLauncher::builder()
        .on_start(move |n| match (start, n) {
            (Start::Instant, _) => StartBehavior::after(ms(0)),
            (Start::Slow, _) => StartBehavior::after(2 * SEC),
            (Start::FirstLaunchFails, 0) => StartBehavior::FailLaunch("no such interpreter".into()),
            (Start::FirstStartHangs, 0) => StartBehavior::Hang,
            (Start::FirstStartupError, 0) => StartBehavior::ExitBeforeHello("segfault".into()),
            _ => StartBehavior::after(ms(50)),
        })
        .on("case", move |_| match call {
            CallKind::Ok => FakeReply::ok(json!("ok")).after(ms(300)),
            CallKind::TooSlow => FakeReply::ok(json!("late")).after(5 * SEC),
            CallKind::SlowIgnoringCancel => FakeReply::ok(json!("late"))
                .after(5 * SEC)
                .ignoring_cancel(),
            CallKind::Error => FakeReply::error("RuntimeError", "boom").after(ms(100)),
            CallKind::Crash => FakeReply::crash(7).after(ms(100)),
            CallKind::Hang => FakeReply::hang(),
            CallKind::Garbage => FakeReply::garbage().after(ms(100)),
        })
        .build()
}

fn expected(
    call: CallKind,
    caller: Caller,
    prefetch: usize,
    result: &Result<pool_core::Payload, Error>,
) -> bool {
    // A call prefetched at a worker that the pool then kills (for another call that overran)
    // goes with it: it may have started, so it is never silently sent elsewhere.
    if prefetch > 0 {
        if let Err(Error::WorkerCrashed { exit, .. }) = result {
            if exit.reason.contains("killed by the pool") {
                return true;
            }
        }
    }
    // A short deadline may expire in the queue or mid-call, whatever the call would have done.
    if caller == Caller::ShortDeadline
        && matches!(
            result,
            Err(Error::Timeout {
                kind: TimeoutKind::Deadline,
                ..
            })
        )
    {
        return true;
    }
    match (call, result) {
        (CallKind::Ok, Ok(p)) => p.value == json!("ok") && caller != Caller::ShortDeadline,
        (CallKind::TooSlow | CallKind::SlowIgnoringCancel | CallKind::Hang, Err(e)) => {
            matches!(
                e,
                Error::Timeout {
                    kind: TimeoutKind::Call,
                    ..
                }
            )
        }
        (CallKind::Error, Err(Error::Handler { error, .. })) => error.kind == "RuntimeError",
        (CallKind::Crash | CallKind::Garbage, Err(Error::WorkerCrashed { .. })) => true,
        _ => false,
    }
}

async fn run_case(start: Start, call: CallKind, caller: Caller, prefetch: usize) {
    let case = format!("{start:?} / {call:?} / {caller:?} / prefetch {prefetch}");
    let launcher = launcher(start, call);
    let config = config(SIZE)
        .max_overflow(OVERFLOW)
        .call_timeout(2 * SEC)
        .cancel_grace(SEC)
        .handshake_timeout(3 * SEC)
        .checkout_timeout(30 * SEC)
        .prefetch(prefetch);
    let pool = Pool::start(config, launcher.clone())
        .await
        .unwrap_or_else(|e| panic!("{case}: {e}"));

    // One caller more than the possible workers take at once: one always queues.
    let callers = (SIZE + OVERFLOW) * (1 + prefetch) + 1;
    let calls = (0..callers).map(|i| {
        let pool = pool.clone();
        async move {
            match caller {
                Caller::ShortDeadline => {
                    pool.call_with("case", json!(i), CallOptions::new().timeout(ms(200)))
                        .await
                }
                _ => pool.call("case", json!(i)).await,
            }
        }
    });
    let mut handles: Vec<_> = calls.map(tokio::spawn).collect();
    match caller {
        Caller::DropsWhileQueued => {
            until("a caller queued", || pool.stats().gauges.waiters >= 1).await;
            handles.pop().unwrap().abort();
        }
        Caller::DropsMidCall => {
            until("a call sent", || launcher.calls_seen() >= 1).await;
            handles.remove(0).abort();
        }
        _ => {}
    }
    for handle in handles {
        match handle.await {
            Ok(result) => assert!(
                expected(call, caller, prefetch, &result),
                "{case}: unexpected {result:?}"
            ),
            Err(join) => assert!(join.is_cancelled(), "{case}: {join}"),
        }
    }

    // Everything settles: no slot held, nobody waiting, every permanent worker back.
    after_time(&format!("{case}: settled"), 60 * SEC, || {
        let gauges = pool.stats().gauges;
        gauges.calls_in_flight == 0 && gauges.waiters == 0 && gauges.workers_ready >= SIZE
    })
    .await;
    let followup = pool.call("echo", json!({"value": "still serving"})).await;
    assert_eq!(
        followup.map(|p| p.value).ok(),
        Some(json!("still serving")),
        "{case}"
    );
    assert!(
        launcher.max_alive() <= SIZE + OVERFLOW,
        "{case}: {} alive at once",
        launcher.max_alive()
    );
    pool.shutdown(5 * SEC).await;
    assert_eq!(launcher.alive(), 0, "{case}: workers left behind");
}

#[tokio::test(start_paused = true)]
async fn every_fault_combination_keeps_the_pool_whole() {
    let starts = [
        Start::Instant,
        Start::Slow,
        Start::FirstLaunchFails,
        Start::FirstStartHangs,
        Start::FirstStartupError,
    ];
    let calls = [
        CallKind::Ok,
        CallKind::TooSlow,
        CallKind::SlowIgnoringCancel,
        CallKind::Error,
        CallKind::Crash,
        CallKind::Hang,
        CallKind::Garbage,
    ];
    let callers = [
        Caller::Awaits,
        Caller::DropsWhileQueued,
        Caller::DropsMidCall,
        Caller::ShortDeadline,
    ];
    let mut cases = Vec::new();
    for start in starts {
        for call in calls {
            for caller in callers {
                for prefetch in [0, 2] {
                    cases.push(run_case(start, call, caller, prefetch));
                }
            }
        }
    }
    // Cases run concurrently on one paused clock; each owns its launcher and pool.
    join_all(cases).await;
}
