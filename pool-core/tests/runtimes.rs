//! A pool serves callers on other runtimes, and what a caller leaves behind is cleaned up on the
//! pool's own runtime, even when the caller's runtime is gone (a per-request or test runtime).
//!
//! Real time: two runtimes cannot share paused time.

mod common;

use std::time::Duration;

use common::*;
use pool_core::{CallOptions, Error};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_abandoned_on_a_runtime_that_then_ends_leaves_a_usable_worker() {
    let launcher = FakeLauncher::builder()
        .on("work", |_| {
            FakeReply::ok(json!("done")).after(Duration::from_secs(30))
        })
        .build();
    let pool = start(
        config(1)
            .cancel_grace(Duration::from_millis(500))
            .checkout_timeout(Duration::from_secs(5)),
        &launcher,
    )
    .await;
    let worker = pool.status().workers[0].id.clone();
    let caller_pool = pool.clone();
    // A short-lived runtime: its call times out, and then the runtime itself ends.
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let outcome = runtime.block_on(caller_pool.call_with(
            "work",
            json!(null),
            CallOptions::new().timeout(Duration::from_millis(100)),
        ));
        drop(runtime);
        outcome
    })
    .join()
    .expect("caller thread");
    assert!(matches!(outcome, Err(Error::Timeout { .. })), "{outcome:?}");
    // The worker confirmed the CANCEL on the pool's runtime and serves again, well within the
    // checkout timeout; it was never killed.
    assert_eq!(
        value(pool.call("echo", json!({"value": 1}))).await,
        json!(1)
    );
    let status = pool.status();
    assert_eq!(status.workers[0].id, worker);
    assert_eq!(pool.stats().counters.killed, 0);
    assert_eq!(pool.stats().counters.cancels_sent, 1);
    finish(pool, &launcher).await;
}
