//! The ipc transport against its physical floor, measured in one run:
//!
//! 1. no-op call round trip through a one-worker ipc pool, next to a raw Rust-to-Python
//!    Unix-socket ping-pong with frames of the same size (no pool, no protocol, no auth);
//! 2. 64 MiB echo throughput through the pool, next to a raw socket copy of a 64 MiB frame to
//!    the same kind of Python echo and back.
//!
//! Run: `cargo run --release -p transport-ipc --example ipc_bench [ROUND_TRIPS]`.
//! Prints Markdown tables for BENCHMARKS.md.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pool_core::{Payload, Pool, PoolConfig};
use pool_testkit::bench;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::process::Command;
use transport_ipc::IpcLauncher;

/// Connects to the socket and echoes length-prefixed frames, as a worker would, without pypool.
const ECHO_SCRIPT: &str = r#"
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
def read_exact(n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None
        got += k
    return buf
while True:
    head = read_exact(4)
    if head is None:
        break
    body = read_exact(struct.unpack(">I", head)[0])
    if body is None:
        break
    sock.sendall(head)
    sock.sendall(body)
"#;

const BIG: usize = 64 * 1024 * 1024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let round_trips: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let app_dir = tempfile::tempdir()?;
    let app = bench::write_bench_app(app_dir.path())?;
    let python = pool_process::ProcessLauncher::new()
        .interpreter(&pool_core::WorkerSpec::new("bench", "probe", app.clone()))
        .await?
        .executable;

    // Pool side: one ipc worker.
    let config = PoolConfig::new(app.clone())
        .size(1)
        .call_timeout(Duration::from_secs(120));
    let pool = Pool::start(config, Arc::new(IpcLauncher::new())).await?;
    let pooled = bench::time_pool_calls(&pool, round_trips).await?;
    let data = Bytes::from((0..BIG).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut pool_big = Vec::new();
    for _ in 0..5 {
        let mut big = Payload::new(json!({}));
        let placeholder = big.attach(data.clone());
        big.value["value"] = placeholder;
        let t = Instant::now();
        let reply = pool.call("echo", big).await?;
        pool_big.push(t.elapsed());
        assert_eq!(reply.as_bytes().map(Bytes::len), Some(BIG));
    }
    pool.shutdown(Duration::from_secs(5)).await;

    // Raw side: a Unix socket and a Python echo, same frame sizes.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raw.sock");
    let listener = UnixListener::bind(&path)?;
    let mut child = Command::new(&python)
        .args(["-c", ECHO_SCRIPT])
        .arg(&path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (mut sock, _) = listener.accept().await?;
    let frame = bench::call_sized_frame();
    let raw = {
        let (mut reader, mut writer) = sock.split();
        bench::time_raw_echo(&mut writer, &mut reader, &frame, round_trips).await?
    };
    let mut big_frame = (BIG as u32).to_be_bytes().to_vec();
    big_frame.extend_from_slice(&data);
    let mut big_back = vec![0u8; big_frame.len()];
    let mut raw_big = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (mut reader, mut writer) = sock.split();
        let (sent, received) = tokio::join!(
            writer.write_all(&big_frame),
            reader.read_exact(&mut big_back)
        );
        sent?;
        received?;
        raw_big.push(t.elapsed());
    }
    drop(sock);
    child.wait().await?;

    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let mib_s = |d: Duration| 2.0 * 64.0 / d.as_secs_f64();
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
        bench::latency_row("raw Unix-socket ping-pong (floor)", &raw, &raw)
    );
    println!(
        "{}",
        bench::latency_row("pypool no-op call (ipc)", &pooled, &raw)
    );
    println!();
    println!("| 64 MiB echo, best of 5 | time | MiB/s (both ways) | raw / pypool throughput |");
    println!("|---|---|---|---|");
    let (raw_t, pool_t) = (best(&raw_big), best(&pool_big));
    println!(
        "| raw socket copy (floor) | {:.0} ms | {:.0} | 1.00 |",
        raw_t.as_secs_f64() * 1e3,
        mib_s(raw_t)
    );
    println!(
        "| pypool echo (ipc) | {:.0} ms | {:.0} | {:.2} |",
        pool_t.as_secs_f64() * 1e3,
        mib_s(pool_t),
        mib_s(raw_t) / mib_s(pool_t)
    );
    Ok(())
}
