//! `Pool::map` and `map_unordered` on fake workers: order, chunk sizes, per-item failures,
//! whole-map failures, bounded read-ahead, cancellation and fairness, on paused time.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use futures::StreamExt;
use pool_core::{Error, MapOptions, Payload, TimeoutKind};
use pool_testkit::{FakeLauncher, FakeReply};
use serde_json::{json, Value};

/// Workers whose `work` answers `10 × n` after `n % 7` ms, `half` fails odd numbers, `slow`
/// takes its argument in ms and `crash_on` exits when given 13.
fn launcher() -> Arc<FakeLauncher> {
    FakeLauncher::builder()
        .on("work", |call| {
            let n = call.args.as_u64().unwrap_or(0);
            FakeReply::ok(json!(n * 10)).after(ms(n % 7))
        })
        .on("half", |call| {
            let n = call.args.as_u64().unwrap_or(0);
            if n % 2 == 1 {
                FakeReply::error("ValueError", &format!("{n} is odd"))
            } else {
                FakeReply::ok(json!(n / 2))
            }
        })
        .on("slow", |call| {
            FakeReply::ok(call.args.clone()).after(ms(call.args.as_u64().unwrap_or(0)))
        })
        .on("crash_on", |call| match call.args.as_u64() {
            Some(13) => FakeReply::crash(1),
            _ => FakeReply::ok(call.args.clone()),
        })
        .on("add", |call| {
            let sum = call.args["a"].as_i64().unwrap_or(0) + call.args["b"].as_i64().unwrap_or(0);
            FakeReply::ok(json!(sum))
        })
        .build()
}

fn values(results: Vec<pool_core::Result<Payload>>) -> Vec<Value> {
    results
        .into_iter()
        .map(|r| match r {
            Ok(p) => p.value,
            Err(err) => panic!("item failed: {err}"),
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn results_come_in_input_order_whatever_each_chunk_takes() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    let results: Vec<_> = pool
        .map_with(
            "work",
            (0..200u64).map(|n| json!(n)),
            MapOptions::new().chunksize(3),
        )
        .collect()
        .await;
    assert_eq!(
        values(results),
        (0..200u64).map(|n| json!(n * 10)).collect::<Vec<_>>()
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn unordered_results_come_as_chunks_finish_with_their_positions() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    // The first chunk is the slowest: an unordered map reports the others first.
    let items = [200u64, 1, 2, 3].into_iter().map(|n| json!(n));
    let order: Vec<_> = pool
        .map_unordered_with("slow", items, MapOptions::new().chunksize(1))
        .map(|(index, result)| {
            assert!(result.is_ok());
            index
        })
        .collect()
        .await;
    assert_eq!(order.len(), 4);
    assert_eq!(order.last(), Some(&0), "{order:?}");
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn an_input_of_known_length_is_cut_like_multiprocessing_pool_map() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    // 1000 items, 2 workers: chunks of ceil(1000 / 8) = 125.
    let results: Vec<_> = pool
        .map("work", (0..1000u64).map(|n| json!(n)))
        .collect()
        .await;
    assert_eq!(results.len(), 1000);
    assert_eq!(launcher.calls_seen(), 8);
    // An explicit chunk size wins.
    let results: Vec<_> = pool
        .map_with(
            "work",
            (0..1000u64).map(|n| json!(n)),
            MapOptions::new().chunksize(100),
        )
        .collect()
        .await;
    assert_eq!(values(results).len(), 1000);
    assert_eq!(launcher.calls_seen(), 8 + 10);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn chunks_of_an_input_of_unknown_length_grow_for_quick_items_only() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    // `filter` hides the length. Items that take no time: chunks grow to the limit quickly.
    let quick = (0..4000u64).filter(|_| true).map(|_| json!(0));
    let results: Vec<_> = pool.map("slow", quick).collect().await;
    assert_eq!(values(results).len(), 4000);
    let quick_calls = launcher.calls_seen();
    assert!(
        quick_calls <= 30,
        "{quick_calls} calls for 4000 quick items"
    );
    // Items of 20 ms each: a chunk would take longer than the 5 ms aimed at, so one item each.
    let slow = (0..40u64).filter(|_| true).map(|_| json!(20));
    let results: Vec<_> = pool.map("slow", slow).collect().await;
    assert_eq!(values(results).len(), 40);
    assert_eq!(launcher.calls_seen() - quick_calls, 40);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn an_item_that_fails_fails_alone_unless_asked_to_stop() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    let results: Vec<_> = pool
        .map_with(
            "half",
            (0..50u64).map(|n| json!(n)),
            MapOptions::new().chunksize(8),
        )
        .collect()
        .await;
    assert_eq!(results.len(), 50);
    for (n, result) in results.iter().enumerate() {
        match result {
            Ok(reply) if n % 2 == 0 => assert_eq!(reply.value, json!(n / 2)),
            Err(Error::Handler { error, .. }) if n % 2 == 1 => {
                assert_eq!(error.message, format!("{n} is odd"))
            }
            other => panic!("item {n}: {other:?}"),
        }
    }
    let results: Vec<_> = pool
        .map_with(
            "half",
            [0u64, 2, 4, 5, 6, 8].map(|n| json!(n)),
            MapOptions::new().chunksize(2).stop_on_error(true),
        )
        .collect()
        .await;
    assert_eq!(results.len(), 4, "the stream ends with the first failure");
    assert!(
        matches!(&results[3], Err(Error::Handler { error, .. }) if error.message == "5 is odd")
    );
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn items_never_sent_and_items_that_raise_keep_their_places_in_one_chunk() {
    let launcher = launcher();
    let pool = start(config(1), &launcher).await;
    // Every third item refers to an attachment it does not have; "half" fails odd numbers.
    let items = (0..30u64).map(|n| match n % 3 {
        0 => Payload::new(json!({"__pypool_att__": 0})),
        _ => Payload::new(json!(n)),
    });
    let results: Vec<_> = pool
        .map_with("half", items, MapOptions::new().chunksize(30))
        .collect()
        .await;
    assert_eq!(results.len(), 30);
    for (n, result) in results.iter().enumerate() {
        match result {
            Err(Error::InvalidArguments { .. }) if n % 3 == 0 => {}
            Err(Error::Handler { error, .. }) if n % 3 != 0 && n % 2 == 1 => {
                assert_eq!(error.message, format!("{n} is odd"))
            }
            Ok(reply) if n % 3 != 0 && n % 2 == 0 => assert_eq!(reply.value, json!(n / 2)),
            other => panic!("item {n}: {other:?}"),
        }
    }
    assert_eq!(launcher.calls_seen(), 1, "one chunk");
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn items_that_cannot_be_sent_fail_in_their_place_and_chunks_fit_in_a_frame() {
    let launcher = FakeLauncher::builder()
        .on("size", |call| {
            FakeReply::ok(json!(call.args.as_str().map_or(0, str::len)))
        })
        .build();
    let pool = start(config(1).max_frame(16 * 1024), &launcher).await;
    let mut items: Vec<Payload> = (0..40)
        .map(|_| Payload::new(json!("x".repeat(1000))))
        .collect();
    // Refers to an attachment it does not have.
    items[5] = Payload::new(json!({"__pypool_att__": 3}));
    // Larger than a frame on its own.
    items[9] = Payload::new(json!("y".repeat(20 * 1024)));
    let results: Vec<_> = pool
        .map_with("size", items, MapOptions::new().chunksize(40))
        .collect()
        .await;
    assert_eq!(results.len(), 40);
    for (i, result) in results.into_iter().enumerate() {
        match (i, result) {
            (5, Err(Error::InvalidArguments { .. })) | (9, Err(Error::RequestTooLarge { .. })) => {}
            (_, Ok(reply)) if i != 5 && i != 9 => assert_eq!(reply.value, json!(1000)),
            (i, other) => panic!("item {i}: {other:?}"),
        }
    }
    // 38 items of about 6 KiB as JSON worst case each, in frames of 16 KiB: several chunks.
    assert!(
        launcher.calls_seen() >= 10,
        "{} calls",
        launcher.calls_seen()
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_lost_mid_chunk_fails_that_chunk_and_the_map_goes_on() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    let results: Vec<_> = pool
        .map_with(
            "crash_on",
            (0..30u64).map(|n| json!(n)),
            MapOptions::new().chunksize(5),
        )
        .collect()
        .await;
    assert_eq!(results.len(), 30);
    for (n, result) in results.into_iter().enumerate() {
        match result {
            Err(Error::WorkerCrashed { .. }) if (10..15).contains(&n) => {}
            Ok(reply) if !(10..15).contains(&n) => assert_eq!(reply.value, json!(n)),
            other => panic!("item {n}: {other:?}"),
        }
    }
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_command_fails_the_map_once() {
    let launcher = launcher();
    let pool = start(config(1), &launcher).await;
    let results: Vec<_> = pool
        .map("wrok", (0..1000u64).map(|n| json!(n)))
        .collect()
        .await;
    assert_eq!(results.len(), 1);
    assert!(
        matches!(&results[0], Err(Error::UnknownCommand { suggestion: Some(s), .. }) if s == "work")
    );
    assert_eq!(launcher.calls_seen(), 0);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_the_map_with_one_timeout() {
    let launcher = launcher();
    let pool = start(config(1), &launcher).await;
    let results: Vec<_> = pool
        .map_with(
            "slow",
            (0..100u64).map(|_| json!(100)),
            MapOptions::new().chunksize(1).timeout(ms(1050)),
        )
        .collect()
        .await;
    let (last, done) = results.split_last().expect("results");
    assert!(
        matches!(
            last,
            Err(Error::Timeout {
                kind: TimeoutKind::Deadline,
                ..
            })
        ),
        "{last:?}"
    );
    assert_eq!(done.len(), 10, "ten 100 ms items fit in 1.05 s");
    assert!(done.iter().all(Result::is_ok));
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn an_endless_input_is_read_only_as_far_as_chunks_can_be_sent() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    let read = Arc::new(AtomicUsize::new(0));
    let counter = read.clone();
    let endless = (0u64..).map(move |n| {
        counter.fetch_add(1, Ordering::SeqCst);
        json!(n)
    });
    let options = MapOptions::new().chunksize(10).chunks_in_flight(4);
    let first: Vec<_> = pool
        .map_with("work", endless, options)
        .take(100)
        .collect()
        .await;
    assert_eq!(values(first).len(), 100);
    // The 100 taken, at most four chunks in flight, and the chunk being filled.
    let read = read.load(Ordering::SeqCst);
    assert!(
        read <= 100 + 4 * 10 + 10,
        "{read} items read for 100 results"
    );
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn dropping_a_map_cancels_its_chunks_and_keeps_the_workers() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    let mut results = pool.map_with(
        "slow",
        (0..100u64).map(|_| json!(1000)),
        MapOptions::new().chunksize(10).chunks_in_flight(2),
    );
    tokio::select! {
        _ = results.next() => panic!("a chunk of 10 s finished"),
        _ = until("both chunks running", || launcher.calls_started() == 2) => {}
    }
    drop(results);
    after_time("cancels answered", SEC, || {
        pool.status().workers.iter().all(|w| w.in_flight == 0)
    })
    .await;
    assert_eq!(pool.stats().counters.killed, 0);
    assert_eq!(launcher.launched(), 2, "no worker was replaced");
    assert_serving(&pool).await;
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_map_waits_its_turn_with_other_callers() {
    let launcher = launcher();
    let pool = start(config(1), &launcher).await;
    // 40 chunks of 100 ms, at most 4 queued: a caller that comes later waits behind at most those
    // 4, not behind the whole map.
    let map = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let options = MapOptions::new().chunksize(1).chunks_in_flight(4);
            let results: Vec<_> = pool
                .map_with("slow", (0..40u64).map(|_| json!(100)), options)
                .collect()
                .await;
            values(results).len()
        })
    };
    until("the map is running", || launcher.calls_started() == 1).await;
    let started = tokio::time::Instant::now();
    let sum = value(pool.call("add", json!({"a": 1, "b": 1}))).await;
    assert_eq!(sum, json!(2));
    assert!(
        started.elapsed() <= ms(500),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(map.await.unwrap(), 40);
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn map_as_serializes_items_and_deserializes_results() {
    let launcher = launcher();
    let pool = start(config(2), &launcher).await;
    let results: Vec<pool_core::Result<u64>> = pool
        .map_as("work", 0..20u64, MapOptions::new())
        .collect()
        .await;
    let results: Vec<u64> = results.into_iter().map(|r| r.expect("item")).collect();
    assert_eq!(results, (0..20u64).map(|n| n * 10).collect::<Vec<_>>());
    // A result that is not a `String` fails its item with a codec error.
    let wrong: Vec<pool_core::Result<String>> = pool
        .map_as("work", 0..2u64, MapOptions::new())
        .collect()
        .await;
    assert!(wrong.iter().all(|r| matches!(r, Err(Error::Codec(_)))));
    finish(pool, &launcher).await;
}
