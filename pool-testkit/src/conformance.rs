//! The transport conformance suite: one set of behaviours every transport must show with real
//! Python workers running `pool-testkit/apps/conformance_app.py`.
//!
//! A transport crate implements [`Target`] and expands [`conformance_suite!`](crate::conformance_suite)
//! in a test file; every case becomes its own `#[tokio::test]`:
//!
//! ```ignore
//! struct Stdio;
//! impl pool_testkit::conformance::Target for Stdio { /* launcher, apps, process_exists */ }
//! pool_testkit::conformance_suite!(Stdio);
//! ```
//!
//! Each case owns its pool, proves its results, and ends by shutting the pool down and checking
//! that no worker process is left.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use pool_core::{
    Affinity, CallOptions, Error, Launcher, MapOptions, Payload, Pool, PoolConfig, TimeoutKind,
};
use serde_json::json;

/// The path of one of pool-testkit's Python apps (`conformance_app.py`, `broken_import_app.py`).
pub fn app_path(name: &str) -> String {
    let apps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("apps");
    apps.join(name).to_string_lossy().into_owned()
}

/// Whether a process with this pid exists, from `/proc` (a zombie has an entry too, which is the
/// point: it was not reaped).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// What a transport gives the suite. Transports whose workers are local Python processes only
/// implement [`launcher`](Target::launcher).
pub trait Target: Send + Sync {
    /// A fresh launcher for one pool.
    fn launcher(&self) -> Arc<dyn Launcher>;
    /// The conformance app (path or module) the workers serve.
    fn app(&self) -> String {
        app_path("conformance_app.py")
    }
    /// An app whose import fails.
    fn broken_app(&self) -> String {
        app_path("broken_import_app.py")
    }
    /// Whether a process with this pid still exists (a zombie counts as existing: it was not
    /// reaped).
    fn process_exists(&self, pid: u32) -> bool {
        process_exists(pid)
    }
    /// Whether workers are real processes that can write to stdout and be signalled (false for
    /// the fakes, which skip the process-level parts of some cases).
    fn real_processes(&self) -> bool {
        true
    }
    /// The interpreter the workers run ([`PoolConfig::python`]); `None` for the launcher's
    /// default.
    fn python(&self) -> Option<String> {
        None
    }
}

/// The pool configuration the cases use: two workers, short limits.
pub fn config(target: &dyn Target) -> PoolConfig {
    let config = PoolConfig::new(target.app())
        .size(2)
        .checkout_timeout(Duration::from_secs(30))
        .call_timeout(Duration::from_secs(30))
        .cancel_grace(Duration::from_millis(500))
        .start_timeout(Duration::from_secs(60));
    match target.python() {
        Some(python) => config.python(python),
        None => config,
    }
}

async fn start(target: &dyn Target, config: PoolConfig) -> Pool {
    match Pool::start(config, target.launcher()).await {
        Ok(pool) => pool,
        Err(err) => panic!("pool failed to start: {err}"),
    }
}

fn pids(pool: &Pool) -> Vec<u32> {
    pool.status().workers.iter().filter_map(|w| w.pid).collect()
}

/// Shuts the pool down and asserts that none of `pids` is left.
async fn finish(target: &dyn Target, pool: Pool, mut pids_seen: Vec<u32>) {
    pids_seen.extend(pids(&pool));
    pool.shutdown(Duration::from_secs(10)).await;
    for pid in pids_seen {
        assert!(
            !target.process_exists(pid),
            "worker process {pid} left behind after shutdown"
        );
    }
}

fn ok(result: Result<Payload, Error>) -> Payload {
    match result {
        Ok(payload) => payload,
        Err(err) => panic!("call failed: {err}"),
    }
}

/// JSON values of every kind travel unchanged.
pub async fn echo_small_values(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    for value in [
        json!(null),
        json!(true),
        json!(-17),
        json!(2.5),
        json!("héllo ✓"),
        json!([1, [2, [3]]]),
        json!({"nested": {"list": [1, "two", null]}}),
    ] {
        let reply = ok(pool.call("echo", json!({ "value": value.clone() })).await);
        assert_eq!(reply.value, value);
    }
    let sum = ok(pool.call("add", json!({"a": 2, "b": 40})).await);
    assert_eq!(sum.value, json!(42));
    finish(target, pool, Vec::new()).await;
}

/// Binary values travel as attachments both ways, small and 64 MiB.
pub async fn echo_binary_values(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    for size in [0usize, 1, 1000, 64 * 1024 * 1024] {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut args = Payload::new(json!({}));
        let placeholder = args.attach(Bytes::from(data.clone()));
        args.value["value"] = placeholder;
        let reply = ok(pool.call("echo", args).await);
        let back = reply
            .as_bytes()
            .unwrap_or_else(|| panic!("no bytes in {:?}", reply.value));
        assert_eq!(back.len(), size);
        assert!(back[..] == data[..], "{size}-byte echo differs");
    }
    finish(target, pool, Vec::new()).await;
}

/// A handler exception is a structured error; the worker keeps serving.
pub async fn handler_exception(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let pid_before = pids(&pool);
    let err = pool
        .call("fail", json!({"message": "bad input"}))
        .await
        .unwrap_err();
    match &err {
        Error::Handler { error, .. } => {
            assert_eq!(error.kind, "ValueError");
            assert_eq!(error.message, "bad input");
            assert!(
                error.traceback.as_deref().unwrap_or("").contains("fail"),
                "{error:?}"
            );
        }
        other => panic!("expected a handler error, got {other}"),
    }
    assert_eq!(
        ok(pool.call("add", json!({"a": 1, "b": 1})).await).value,
        json!(2)
    );
    assert_eq!(
        pids(&pool),
        pid_before,
        "the worker must survive a handler exception"
    );
    finish(target, pool, pid_before).await;
}

/// An unknown command fails at once with the commands the workers announced (and the closest
/// one); the workers keep serving.
pub async fn unknown_command(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let err = pool.call("ecoh", json!({})).await.unwrap_err();
    match &err {
        Error::UnknownCommand {
            known, suggestion, ..
        } => {
            assert!(known.iter().any(|c| c == "echo"), "{known:?}");
            assert_eq!(suggestion.as_deref(), Some("echo"));
        }
        other => panic!("expected UnknownCommand, got {other}"),
    }
    assert_eq!(
        ok(pool.call("echo", json!({"value": 1})).await).value,
        json!(1)
    );
    finish(target, pool, Vec::new()).await;
}

/// `print()`, `os.write(1, ...)` and `sys.stdout.write` in a handler cannot corrupt the stream.
pub async fn stdout_noise_is_harmless(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    for i in 0..5 {
        let reply = ok(pool.call("noisy", json!({"value": i})).await);
        assert_eq!(reply.value, json!(i));
    }
    assert_eq!(pool.stats().counters.crashes, 0);
    finish(target, pool, Vec::new()).await;
}

/// A handler that sleeps past its deadline: the worker is killed and replaced; the next call
/// succeeds and never sees the late reply.
pub async fn overrunning_handler_is_killed_and_replaced(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let first = pids(&pool);
    let err = pool
        .call_with(
            "sleep",
            json!({"seconds": 30}),
            CallOptions::new().timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                kind: TimeoutKind::Deadline,
                ..
            }
        ),
        "{err}"
    );
    let reply = ok(pool.call("echo", json!({"value": "after"})).await);
    assert_eq!(reply.value, json!("after"));
    if target.real_processes() {
        assert_ne!(
            pids(&pool),
            first,
            "the overrunning worker must have been replaced"
        );
        for pid in &first {
            assert!(
                !target.process_exists(*pid),
                "killed worker {pid} not reaped"
            );
        }
    }
    assert_eq!(pool.stats().counters.killed, 1);
    finish(target, pool, first).await;
}

/// A worker that exits mid-call: typed crash error with exit code and stderr tail.
pub async fn exit_mid_call_is_a_crash_with_code_and_stderr(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let first = pids(&pool);
    let err = pool.call("exit", json!({"code": 3})).await.unwrap_err();
    match &err {
        Error::WorkerCrashed { exit, .. } => {
            assert_eq!(exit.exit.and_then(|e| e.code), Some(3), "{err}");
        }
        other => panic!("expected a crash, got {other}"),
    }
    if target.real_processes() {
        let err = pool
            .call(
                "stderr_then_exit",
                json!({"code": 4, "line": "fatal: model file missing"}),
            )
            .await
            .unwrap_err();
        match &err {
            Error::WorkerCrashed { exit, .. } => {
                assert_eq!(exit.exit.and_then(|e| e.code), Some(4), "{err}");
                assert!(
                    exit.stderr_tail
                        .iter()
                        .any(|l| l.contains("fatal: model file missing")),
                    "stderr tail lacks the line: {:?}",
                    exit.stderr_tail
                );
            }
            other => panic!("expected a crash, got {other}"),
        }
    }
    assert_eq!(
        ok(pool.call("echo", json!({"value": 1})).await).value,
        json!(1)
    );
    finish(target, pool, first).await;
}

/// A worker killed by SIGKILL mid-call: typed crash error naming the signal.
pub async fn sigkill_mid_call_is_a_crash_with_signal(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let first = pids(&pool);
    let err = pool.call("kill_self", json!({})).await.unwrap_err();
    match &err {
        Error::WorkerCrashed { exit, .. } => {
            assert_eq!(exit.exit.and_then(|e| e.signal), Some(9), "{err}");
        }
        other => panic!("expected a crash, got {other}"),
    }
    assert_eq!(
        ok(pool.call("echo", json!({"value": 1})).await).value,
        json!(1)
    );
    finish(target, pool, first).await;
}

/// An app that fails to import makes `Pool::start` fail fast with the import error.
pub async fn broken_app_fails_start_with_the_import_error(target: &dyn Target) {
    let config = config(target).size(2);
    let config = PoolConfig {
        app: target.broken_app(),
        ..config
    };
    let started = std::time::Instant::now();
    let err = Pool::start(config, target.launcher()).await.unwrap_err();
    match &err {
        Error::StartFailed { reason, .. } => {
            assert!(
                reason.contains("missing_dependency"),
                "start error lacks the import error: {reason}"
            );
        }
        other => panic!("expected StartFailed, got {other}"),
    }
    // Fails on the first STARTUP_ERROR, not after retries or timeouts (generous bound: the
    // interpreter start itself).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// Strict affinity keeps per-session state on one worker; `end()` drops it.
pub async fn session_state_with_strict_affinity(target: &dyn Target) {
    let pool = start(target, config(target).size(3)).await;
    let session = pool.session_with("user-7", Affinity::Strict);
    ok(session
        .call("remember", json!({"key": "name", "value": "Ada"}))
        .await);
    for _ in 0..6 {
        ok(pool.call("echo", json!({"value": 0})).await);
        assert_eq!(
            ok(session.call("recall", json!({"key": "name"})).await).value,
            json!("Ada")
        );
    }
    let other = pool.session_with("user-8", Affinity::Strict);
    assert_eq!(
        ok(other.call("recall", json!({"key": "name"})).await).value,
        json!(null)
    );
    session.end().await;
    let again = pool.session_with("user-7", Affinity::Strict);
    assert_eq!(
        ok(again.call("recall", json!({"key": "name"})).await).value,
        json!(null)
    );
    finish(target, pool, Vec::new()).await;
}

/// An async handler runs several calls at once in one worker.
pub async fn async_calls_run_concurrently_in_one_worker(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let capacity = pool.status().workers[0].max_in_flight;
    assert!(
        capacity >= 4,
        "the conformance app announces max_in_flight 4, got {capacity}"
    );
    let calls = (0..4).map(|_| pool.call("async_sleep", json!({"seconds": 2})));
    let watch = async {
        // All four must be in flight on the one worker at the same moment.
        loop {
            if pool.status().workers[0].in_flight == 4 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (results, ()) = tokio::join!(futures::future::join_all(calls), watch);
    for result in results {
        assert_eq!(ok(result).value, json!(2));
    }
    finish(target, pool, Vec::new()).await;
}

/// A generator streams 1,000 chunks in order.
pub async fn stream_of_a_thousand_chunks(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let stream = match pool.call_stream("stream", json!({"n": 1000})).await {
        Ok(stream) => stream,
        Err(err) => panic!("stream failed: {err}"),
    };
    let items: Vec<_> = stream.map(|item| ok(item).value).collect().await;
    assert_eq!(items, (0..1000).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(
        ok(pool.call("stream", json!({"n": 3})).await).value,
        json!([0, 1, 2])
    );
    finish(target, pool, Vec::new()).await;
}

/// Graceful shutdown leaves no process and no zombie.
pub async fn shutdown_leaves_no_process(target: &dyn Target) {
    let pool = start(target, config(target).size(3)).await;
    ok(pool.call("echo", json!({"value": 1})).await);
    let seen = pids(&pool);
    assert_eq!(seen.len(), 3);
    finish(target, pool, seen).await;
}

/// Dropping the pool without shutdown kills every worker (reaped in the background).
pub async fn drop_leaves_no_process(target: &dyn Target) {
    let pool = start(target, config(target).size(3)).await;
    let seen = pids(&pool);
    drop(pool);
    for pid in seen {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Reaping after a kill is asynchronous: wait for this pid to go, with a bound.
        while target.process_exists(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "worker {pid} survived the pool's drop"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The worker that answers `pid` (a pool of one).
async fn worker_pid(pool: &Pool) -> u64 {
    ok(pool.call("pid", json!({})).await)
        .value
        .as_u64()
        .expect("a pid")
}

/// A result nested deeper than the pool decodes fails its call with a handler-level error; the
/// worker lives on, and values within the limit arrive intact.
pub async fn deep_results_fail_only_their_call(target: &dyn Target) {
    if !target.real_processes() {
        return; // About what Python's encoders produce: real workers only.
    }
    let pool = start(target, config(target).size(1)).await;
    let pid = worker_pid(&pool).await;
    let mut expected = json!(1);
    for _ in 0..90 {
        expected = json!([expected]);
    }
    assert_eq!(
        ok(pool.call("nested", json!({"depth": 90})).await).value,
        expected
    );
    let err = pool
        .call("nested", json!({"depth": 150}))
        .await
        .unwrap_err();
    match &err {
        Error::Handler { error, .. } => {
            assert_eq!(error.kind, "pypool.UndecodableValue", "{err}")
        }
        other => panic!("expected a handler-level error, got {other}"),
    }
    assert_eq!(worker_pid(&pool).await, pid, "the worker was replaced");
    finish(target, pool, vec![pid as u32]).await;
}

/// Integers round-trip exactly within 64 bits; beyond, the call fails instead of the value
/// silently becoming a float.
pub async fn integers_beyond_64_bits_are_an_error_not_a_float(target: &dyn Target) {
    if !target.real_processes() {
        return; // About what Python's encoders produce: real workers only.
    }
    let pool = start(target, config(target).size(1)).await;
    let pid = worker_pid(&pool).await;
    let max = ok(pool.call("power_of_two", json!({"n": 63})).await).value;
    assert_eq!(max.as_u64(), Some(1 << 63));
    let min = ok(pool
        .call("power_of_two", json!({"n": 63, "negative": true}))
        .await)
    .value;
    assert_eq!(min.as_i64(), Some(i64::MIN));
    for (n, negative) in [(64, false), (70, false), (64, true)] {
        let err = pool
            .call("power_of_two", json!({"n": n, "negative": negative}))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Handler { .. }),
            "2**{n} (negative: {negative}) gave {err}"
        );
    }
    assert_eq!(worker_pid(&pool).await, pid, "the worker was replaced");
    finish(target, pool, vec![pid as u32]).await;
}

/// Arguments that cannot be sent (a placeholder with no attachment, values nested too deep)
/// fail their call before anything is sent; the worker is untouched.
pub async fn invalid_arguments_fail_only_their_call(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let pid = worker_pid(&pool).await;
    let err = pool
        .call("echo", json!({"value": {"__pypool_att__": 0}}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArguments { .. }), "{err}");
    let mut deep = json!(1);
    for _ in 0..1000 {
        deep = json!([deep]);
    }
    let err = pool
        .call("echo", json!({ "value": deep }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArguments { .. }), "{err}");
    assert_eq!(worker_pid(&pool).await, pid, "the worker was replaced");
    finish(target, pool, vec![pid as u32]).await;
}

/// `call` on a stream that never ends stops at `max_reply_bytes` and cancels the handler; the
/// worker lives on. Requests larger than `max_frame` are refused before they are sent.
pub async fn reply_and_request_limits_spare_the_worker(target: &dyn Target) {
    let config = config(target)
        .size(1)
        .max_reply_bytes(64 * 1024)
        .max_frame(1024 * 1024);
    let pool = start(target, config).await;
    let pid = worker_pid(&pool).await;
    let err = pool.call("count", json!({})).await.unwrap_err();
    assert!(matches!(err, Error::ReplyTooLarge { .. }), "{err}");
    let err = pool
        .call("echo", Payload::from_bytes(vec![7u8; 2 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RequestTooLarge { .. }), "{err}");
    assert_eq!(worker_pid(&pool).await, pid, "the worker was replaced");
    assert_eq!(pool.stats().counters.killed, 0);
    finish(target, pool, vec![pid as u32]).await;
}

/// `map` runs a handler over many items in chunks: results come in input order (or with their
/// positions, unordered), an item that raises fails alone, and the worker keeps serving.
pub async fn map_in_order_with_per_item_errors(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    let before = pids(&pool);
    let results: Vec<_> = pool
        .map("half", (0..1000).map(|n| json!({ "n": n })))
        .collect()
        .await;
    assert_eq!(results.len(), 1000);
    for (n, result) in results.into_iter().enumerate() {
        match result {
            Ok(reply) if n % 2 == 0 => assert_eq!(reply.value, json!(n / 2)),
            Err(Error::Handler { error, .. }) if n % 2 == 1 => {
                assert_eq!(error.kind, "ValueError");
                assert_eq!(error.message, format!("{n} is odd"));
            }
            other => panic!("item {n}: unexpected {other:?}"),
        }
    }

    let mut seen = vec![false; 300];
    let mut results = pool.map_unordered_with(
        "half",
        (0..300).map(|n| json!({ "n": 2 * n })),
        MapOptions::new().chunksize(7),
    );
    while let Some((index, result)) = results.next().await {
        assert!(!seen[index], "item {index} reported twice");
        seen[index] = true;
        assert_eq!(ok(result).value, json!(index));
    }
    assert!(seen.iter().all(|s| *s), "some items never reported");

    let results: Vec<_> = pool
        .map_with(
            "half",
            (0..100).map(|n| json!({ "n": n })),
            MapOptions::new().chunksize(10).stop_on_error(true),
        )
        .collect()
        .await;
    assert_eq!(results.len(), 2, "stop_on_error ends the map at item 1");
    assert!(matches!(results[1], Err(Error::Handler { .. })));

    let results: Vec<_> = pool
        .map("hlaf", (0..100).map(|n| json!({ "n": n })))
        .collect()
        .await;
    assert_eq!(results.len(), 1, "an unknown command fails the map once");
    assert!(matches!(results[0], Err(Error::UnknownCommand { .. })));
    assert_eq!(pids(&pool), before, "no worker may be lost to a map");
    finish(target, pool, before).await;
}

/// A map's items carry bytes both ways (each item's attachments its own), a streaming handler's
/// items come back as lists, and an async handler's items run concurrently up to the worker's
/// `max_in_flight`.
pub async fn map_carries_bytes_streams_and_async_items(target: &dyn Target) {
    let pool = start(target, config(target).size(1)).await;
    let blobs: Vec<Vec<u8>> = (0..20)
        .map(|i| (0..i * 100).map(|b| (b % 251) as u8).collect())
        .collect();
    let items = blobs.clone().into_iter().map(|blob| {
        let mut args = Payload::new(json!({}));
        args.value["value"] = args.attach(Bytes::from(blob));
        args
    });
    let results: Vec<_> = pool
        .map_with("echo", items, MapOptions::new().chunksize(6))
        .collect()
        .await;
    for (blob, result) in blobs.iter().zip(results) {
        let reply = ok(result);
        assert_eq!(reply.attachments.len(), 1, "{:?}", reply.value);
        assert!(reply.as_bytes().map(|b| &b[..]) == Some(&blob[..]));
    }

    let lists: Vec<_> = pool
        .map("stream", (0..5).map(|n| json!({ "n": n })))
        .map(|result| ok(result).value)
        .collect()
        .await;
    assert_eq!(
        lists,
        vec![
            json!([]),
            json!([0]),
            json!([0, 1]),
            json!([0, 1, 2]),
            json!([0, 1, 2, 3])
        ]
    );

    let peaks: Vec<_> = pool
        .map_with(
            "meet",
            (0..8).map(|i| json!({ "i": i })),
            MapOptions::new().chunksize(8),
        )
        .map(|result| ok(result).value)
        .collect()
        .await;
    assert_eq!(
        peaks.iter().filter_map(|p| p.as_u64()).max(),
        Some(4),
        "{peaks:?}"
    );
    finish(target, pool, Vec::new()).await;
}

/// Dropping a map cancels its chunk between two items: the worker answers CANCELLED and lives
/// on (the items are CPU work on the worker's reader thread, which must still read the CANCEL).
pub async fn map_dropped_mid_chunk_is_cancelled_between_items(target: &dyn Target) {
    let pool = start(
        target,
        config(target).size(1).cancel_grace(Duration::from_secs(5)),
    )
    .await;
    let before = pids(&pool);
    let mut results = pool.map_with(
        "spin",
        (0..100).map(|_| json!({ "seconds": 0.1 })),
        MapOptions::new().chunksize(100),
    );
    tokio::select! {
        _ = results.next() => panic!("a chunk of 100 × 0.1 s finished"),
        _ = async {
            while pool.status().workers[0].in_flight == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } => {}
    }
    drop(results);
    while pool.status().workers[0].in_flight > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        pool.stats().counters.killed,
        0,
        "the worker had to be killed"
    );
    assert_eq!(pids(&pool), before);
    assert_eq!(
        ok(pool.call("add", json!({"a": 1, "b": 2})).await).value,
        json!(3)
    );
    finish(target, pool, before).await;
}

/// Expands to one `#[tokio::test]` per conformance case for `$target` (an expression whose type
/// implements [`Target`]).
#[macro_export]
macro_rules! conformance_suite {
    ($target:expr) => {
        $crate::conformance_suite!(@cases $target;
            echo_small_values,
            echo_binary_values,
            handler_exception,
            unknown_command,
            stdout_noise_is_harmless,
            overrunning_handler_is_killed_and_replaced,
            exit_mid_call_is_a_crash_with_code_and_stderr,
            sigkill_mid_call_is_a_crash_with_signal,
            broken_app_fails_start_with_the_import_error,
            session_state_with_strict_affinity,
            async_calls_run_concurrently_in_one_worker,
            stream_of_a_thousand_chunks,
            deep_results_fail_only_their_call,
            integers_beyond_64_bits_are_an_error_not_a_float,
            invalid_arguments_fail_only_their_call,
            reply_and_request_limits_spare_the_worker,
            map_in_order_with_per_item_errors,
            map_carries_bytes_streams_and_async_items,
            map_dropped_mid_chunk_is_cancelled_between_items,
            shutdown_leaves_no_process,
            drop_leaves_no_process,
        );
    };
    (@cases $target:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case(&$target).await;
            }
        )*
    };
}
