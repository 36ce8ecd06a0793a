//! Pools `examples/text_stats.py` over stdio: eight workers on the embedded runtime, plain and
//! session calls, a streamed analysis, a handler error, and the pool's statistics.
//!
//! Run: `cargo run --release -p transport-stdio --example text_stats` (needs only `python3`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pool_core::{Affinity, Pool, PoolConfig};
use serde_json::json;
use transport_stdio::StdioLauncher;

const TEXT: &str = "The pool starts every interpreter at once. It counts a worker ready only \
after its handshake! Callers queue fairly, and a crashed worker is replaced in the background. \
Nothing is left behind when the pool shuts down.";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/text_stats.py");
    let config = PoolConfig::new(app.to_string_lossy())
        .name("text-stats")
        .size(8)
        .default_affinity(Affinity::Strict);
    let started = Instant::now();
    let pool = Pool::start(config, Arc::new(StdioLauncher::new())).await?;
    println!("8 workers ready in {:?}", started.elapsed());

    let counts = pool.call("word_count", json!({ "text": TEXT })).await?;
    println!("word_count: {}", counts.value);
    let top = pool
        .call("top_words", json!({ "text": TEXT, "n": 3 }))
        .await?;
    println!("top_words: {}", top.value);

    let mut lines = pool
        .call_stream(
            "analyze_lines",
            json!({ "text": "one line\nand another line" }),
        )
        .await?;
    while let Some(line) = lines.next().await {
        println!("analyze_lines item: {}", line?.value);
    }

    let session = pool.session("reader-1");
    for document in [
        "a first small document",
        "a second document, a little longer",
    ] {
        session
            .call("add_document", json!({ "text": document }))
            .await?;
    }
    println!(
        "corpus_summary: {}",
        session
            .call("corpus_summary", json!({ "n": 2 }))
            .await?
            .value
    );
    session.end().await;

    match pool.call("word_count", json!({ "text": 42 })).await {
        Ok(reply) => println!("unexpected success: {}", reply.value),
        Err(err) => {
            println!("a bad argument raises in Python and arrives as a structured error:\n  {err}")
        }
    }

    let stats = pool.stats();
    println!(
        "calls ok {}, failed {}, call time p50 {} µs, p99 {} µs",
        stats.counters.calls_ok,
        stats.counters.calls_failed,
        stats.call_time.p50_us,
        stats.call_time.p99_us
    );
    pool.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
