//! The stdio transport against its physical floor, measured in one run:
//!
//! 1. no-op call round trip through a one-worker pool, next to a raw Rust-to-Python pipe
//!    ping-pong with frames of the same size (no pool, no protocol);
//! 2. time until 32 pool workers are ready, next to 32 bare interpreters answering one ping.
//!
//! Run: `cargo run --release -p transport-stdio --example stdio_bench [ROUND_TRIPS]`.
//! Prints a Markdown table for BENCHMARKS.md.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pool_core::protocol::{encode, Codec, Message};
use pool_core::{Pool, PoolConfig, WorkerSpec};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use transport_stdio::StdioLauncher;

const ECHO_SCRIPT: &str = r#"
import sys, struct
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    body = inp.read(struct.unpack(">I", head)[0])
    out.write(head + body)
    out.flush()
"#;

const BENCH_APP: &str =
    "from pypool_worker import handler\n\n@handler\ndef echo(value):\n    return value\n";

const PING_SCRIPT: &str = "import sys\nsys.stdin.readline()\nprint('pong', flush=True)\n";

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds")
}

fn row(name: &str, h: &Histogram<u64>, base: &Histogram<u64>) -> String {
    format!(
        "| {name} | {:.1} | {} | {} | {:.2} |",
        h.mean(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.mean() / base.mean()
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let round_trips: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    // A typical app: sync handlers only (an app with async handlers also loads asyncio).
    let app_dir = tempfile::tempdir()?;
    let app = app_dir.path().join("bench_app.py");
    std::fs::write(&app, BENCH_APP)?;
    let app = app.to_string_lossy().into_owned();
    let launcher = Arc::new(StdioLauncher::new());
    let python = launcher
        .interpreter(&WorkerSpec::new("bench", "probe", app.clone()))
        .await?
        .executable;

    // 1a. Pool round trip.
    let pool = Pool::start(PoolConfig::new(app.clone()).size(1), launcher.clone()).await?;
    let args = json!({"value": 1});
    for _ in 0..200 {
        pool.call("echo", args.clone()).await?;
    }
    let mut pooled = histogram();
    for _ in 0..round_trips {
        let t = Instant::now();
        pool.call("echo", args.clone()).await?;
        pooled.saturating_record(t.elapsed().as_micros() as u64);
    }
    pool.shutdown(Duration::from_secs(5)).await;

    // 1b. Raw pipe ping-pong with a frame as large as the pool's CALL frame.
    let call = Message::Call {
        id: 1_000_000,
        command: "echo".into(),
        args: args.clone(),
        session: None,
        timeout_ms: Some(60_000),
    };
    let body = encode(&call, Codec::Json, &[])?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut child = Command::new(&python)
        .args(["-c", ECHO_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut back = vec![0u8; frame.len()];
    for _ in 0..200 {
        stdin.write_all(&frame).await?;
        stdout.read_exact(&mut back).await?;
    }
    let mut raw = histogram();
    for _ in 0..round_trips {
        let t = Instant::now();
        stdin.write_all(&frame).await?;
        stdout.read_exact(&mut back).await?;
        raw.saturating_record(t.elapsed().as_micros() as u64);
    }
    drop(stdin);
    child.wait().await?;

    // 2a. 32 pool workers until ready.
    let t = Instant::now();
    let pool = Pool::start(PoolConfig::new(app.clone()).size(32), launcher.clone()).await?;
    let pool_ready = t.elapsed();
    pool.shutdown(Duration::from_secs(5)).await;

    // 2b. 32 bare interpreters answering one ping.
    let t = Instant::now();
    let pings = (0..32).map(|_| {
        let python = python.clone();
        async move {
            let mut child = Command::new(&python)
                .args(["-c", PING_SCRIPT])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let mut stdin = child
                .stdin
                .take()
                .ok_or(std::io::Error::other("no stdin"))?;
            stdin.write_all(b"ping\n").await?;
            let mut line = String::new();
            let stdout = child
                .stdout
                .take()
                .ok_or(std::io::Error::other("no stdout"))?;
            BufReader::new(stdout).read_line(&mut line).await?;
            child.wait().await?;
            Ok::<_, std::io::Error>(line)
        }
    });
    for answer in futures::future::join_all(pings).await {
        assert_eq!(answer?.trim(), "pong");
    }
    let bare_ready = t.elapsed();

    println!(
        "Round trips: {round_trips} sequential, frame {} bytes, interpreter {}",
        frame.len(),
        python.display()
    );
    println!();
    println!("| round trip (µs) | mean | p50 | p99 | mean / raw |");
    println!("|---|---|---|---|---|");
    println!("{}", row("raw pipe ping-pong (floor)", &raw, &raw));
    println!("{}", row("pypool no-op call (stdio)", &pooled, &raw));
    println!();
    println!("| start-up | time | / bare |");
    println!("|---|---|---|");
    println!(
        "| 32 bare interpreters answer one ping | {:.0} ms | 1.00 |",
        bare_ready.as_secs_f64() * 1e3
    );
    println!(
        "| pypool: 32 workers ready (handshake done) | {:.0} ms | {:.2} |",
        pool_ready.as_secs_f64() * 1e3,
        pool_ready.as_secs_f64() / bare_ready.as_secs_f64()
    );
    Ok(())
}
