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

use pool_core::{Pool, PoolConfig, WorkerSpec};
use pool_testkit::bench;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

const PING_SCRIPT: &str = "import sys\nsys.stdin.readline()\nprint('pong', flush=True)\n";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let round_trips: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let app_dir = tempfile::tempdir()?;
    let app = bench::write_bench_app(app_dir.path())?;
    let launcher = Arc::new(StdioLauncher::new());
    let python = launcher
        .processes()
        .interpreter(&WorkerSpec::new("bench", "probe", app.clone()))
        .await?
        .executable;

    // 1a. Pool round trip.
    let pool = Pool::start(PoolConfig::new(app.clone()).size(1), launcher.clone()).await?;
    let pooled = bench::time_pool_calls(&pool, round_trips).await?;
    pool.shutdown(Duration::from_secs(5)).await;

    // 1b. Raw pipe ping-pong with a frame as large as the pool's CALL frame.
    let frame = bench::call_sized_frame();
    let mut child = Command::new(&python)
        .args(["-c", ECHO_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let raw = bench::time_raw_echo(&mut stdin, &mut stdout, &frame, round_trips).await?;
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
    println!(
        "{}",
        bench::latency_row("raw pipe ping-pong (floor)", &raw, &raw)
    );
    println!(
        "{}",
        bench::latency_row("pypool no-op call (stdio)", &pooled, &raw)
    );
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
