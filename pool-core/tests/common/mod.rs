//! Helpers shared by the pool-core integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use pool_core::{Pool, PoolConfig};
use pool_testkit::FakeLauncher;

pub const SEC: Duration = Duration::from_secs(1);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A config with short, test-friendly time limits, and no prefetch: the queueing tests count on
/// one call per worker at a time (`prefetch.rs` tests prefetch).
pub fn config(size: usize) -> PoolConfig {
    PoolConfig::new("fake_app")
        .prefetch(0)
        .size(size)
        .checkout_timeout(5 * SEC)
        .call_timeout(10 * SEC)
        .cancel_grace(SEC)
        .start_timeout(30 * SEC)
}

pub async fn start(config: PoolConfig, launcher: &Arc<FakeLauncher>) -> Pool {
    Pool::start(config, launcher.clone())
        .await
        .expect("pool starts")
}

/// Shuts the pool down and proves nothing it started is left.
pub async fn finish(pool: Pool, launcher: &Arc<FakeLauncher>) {
    pool.shutdown(5 * SEC).await;
    launcher.assert_all_gone();
}

/// Lets other tasks run until `cond` holds. Panics if it never does: a condition to wait on, never
/// a sleep.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// Lets virtual time run, in 10 ms steps for at most `limit`, until `cond` holds. Used on paused
/// time for conditions that need timers (backoff, cooldown) to fire; deterministic, because
/// paused time only moves when every task is idle.
pub async fn after_time(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(ms(10)).await;
    }
    panic!("did not happen within {limit:?} of virtual time: {what}");
}

/// Starts `pool.call(command, args)` on its own task.
pub fn spawn_call(
    pool: &Pool,
    command: &'static str,
    args: serde_json::Value,
) -> tokio::task::JoinHandle<pool_core::Result<pool_core::Payload>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.call(command, args).await })
}

/// The value of a call that must succeed.
pub async fn value(
    call: impl std::future::Future<Output = pool_core::Result<pool_core::Payload>>,
) -> serde_json::Value {
    match call.await {
        Ok(payload) => payload.value,
        Err(err) => panic!("call failed: {err}"),
    }
}

/// Proves the pool still serves: a fresh call succeeds with the right answer.
pub async fn assert_serving(pool: &Pool) {
    let sum = value(pool.call("add", serde_json::json!({"a": 1, "b": 1}))).await;
    assert_eq!(sum, serde_json::json!(2), "the pool no longer serves calls");
}
