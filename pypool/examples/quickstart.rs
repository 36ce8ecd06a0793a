//! The README's quickstart: `cargo run -p pypool --example quickstart` (needs only `python3`).

use std::time::Duration;

use pypool::Affinity;
use serde_json::json;

#[tokio::main]
async fn main() -> pypool::Result<()> {
    let handlers = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/quickstart_handlers.py"
    );
    let pool = pypool::builder(handlers) // the stdio transport unless told otherwise
        .size(8) // 8 interpreters, started concurrently
        .checkout_timeout(Duration::from_secs(5))
        .call_timeout(Duration::from_secs(30))
        .require_commands(["predict", "remember", "recall"]) // checked at start
        .start()
        .await?;

    let score = pool
        .call("predict", json!({"features": [1.0, 2.0, 3.0]}))
        .await?;
    println!("score = {}", score.value);

    let user = pool.session_with("user-7", Affinity::Strict); // state lives on one worker
    user.call("remember", json!({"key": "name", "value": "Ada"}))
        .await?;
    println!(
        "name = {}",
        user.call("recall", json!({"key": "name"})).await?.value
    );
    user.end().await; // the worker drops the session's state

    println!("{:#?}", pool.stats().counters);
    pool.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
