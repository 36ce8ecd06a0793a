//! The ipc transport against its physical floor, measured in one run:
//!
//! 1. **Latency**: one caller making sequential no-op calls through a one-worker ipc pool, next
//!    to a raw Rust-to-Python length-prefixed Unix-socket echo of a frame as large as the pool's
//!    CALL (no pool, no protocol, no auth). The Python side of the echo is the least a process
//!    can do per frame: `recv` what arrived, find the frame by its length, `sendall` it back.
//!    The Rust side is measured twice: blocking `std` I/O from a dedicated thread (the floor)
//!    and a tokio `UnixStream` from a runtime task (what an async service has to work with).
//!    A third echo does what the wire protocol itself requires and nothing more
//!    ([`bench::PROTOCOL_ECHO_SERVE`], driven by tokio): the floor of any pool speaking it.
//!    All four stay set up for the whole run and take turns in blocks of `--block` round
//!    trips, in a rotating order, after the same warm-up, so that each sees the same machine;
//!    each repeat gives every contender the same number of round trips.
//! 2. **Large frames**: 64 MiB echoed through the pool, next to a raw socket copy of a 64 MiB
//!    frame to the same kind of Python echo and back (best of 5 each).
//!
//! Run: `cargo run --release -p transport-ipc --example ipc_bench -- [OPTIONS]`; to pin the
//! whole process tree to one CPU: `taskset -c 0 target/release/examples/ipc_bench`.
//! Options: `--round-trips N` per repeat (5000), `--block N` (200), `--repeat N` (3),
//! `--only latency|big`, `--json` (one JSON object on stdout instead of Markdown tables).
//!
//! Every latency figure is the median over the repeats with its range; a ratio is pypool's
//! figure divided by the floor's within one repeat (above 1: pypool is slower by that factor).
//! The floor of a repeat is the faster of the two raw echoes in it.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pool_core::protocol::Codec;
use pool_core::{Payload, Pool, PoolConfig};
use pool_testkit::bench;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use transport_ipc::IpcLauncher;

/// Connects to the socket given as its argument and echoes every complete length-prefixed
/// frame that arrived, as a worker would, without pypool.
const ECHO_SCRIPT: &str = r#"
import socket, sys

def serve(sock):  # locals, not globals: the least work per frame
    recv, send = sock.recv, sock.sendall
    buf = bytearray()  # appending and dropping from the front are amortised O(1): 64 MiB too
    while True:
        data = recv(65536)  # not more: recv allocates its size up front (1 MiB = an mmap a call)
        if not data:
            return
        buf += data
        end, size = 0, len(buf)
        while size - end >= 4:
            frame = 4 + int.from_bytes(buf[end:end + 4], "big")
            if size - end < frame:
                break
            end += frame
        if end:
            send(memoryview(buf)[:end])
            del buf[:end]

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
serve(sock)
"#;

const BIG: usize = 64 * 1024 * 1024;
const WARM_UP: usize = 200;

struct Options {
    round_trips: usize,
    block: usize,
    repeat: usize,
    latency: bool,
    big: bool,
    json: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        round_trips: 5000,
        block: 200,
        repeat: 3,
        latency: true,
        big: true,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{arg} takes a positive number"))
        };
        match arg.as_str() {
            "--round-trips" => o.round_trips = number()?,
            "--block" => o.block = number()?,
            "--repeat" => o.repeat = number()?,
            "--json" => o.json = true,
            "--only" => match args.next().as_deref() {
                Some("latency") => o.big = false,
                Some("big") => o.latency = false,
                _ => return Err("--only takes latency or big".into()),
            },
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// Starts the Python echo, connected to a fresh socket; returns it and the accepted stream.
fn start_echo(
    python: &Path,
    dir: &Path,
    name: &str,
) -> std::io::Result<(std::process::Child, std::os::unix::net::UnixStream)> {
    let path = dir.join(name);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let child = std::process::Command::new(python)
        .args(["-c", ECHO_SCRIPT])
        .arg(&path)
        .stdin(Stdio::null())
        .spawn()?;
    let (stream, _) = listener.accept()?;
    Ok((child, stream))
}

/// The floor's echo process on a Unix socket, driven with blocking `std` I/O from a thread.
fn start_blocking_echo(
    python: &Path,
    dir: &Path,
    frame: Arc<[u8]>,
) -> std::io::Result<bench::BlockingEcho> {
    let (child, sock) = start_echo(python, dir, "blocking.sock")?;
    let writer = sock.try_clone()?;
    Ok(bench::BlockingEcho::spawn(child, writer, sock, frame))
}

/// A raw echo driven through a tokio `UnixStream` from a runtime task.
struct TokioEcho {
    sock: Option<tokio::net::UnixStream>,
    child: std::process::Child,
    frame: Arc<[u8]>,
}

impl TokioEcho {
    fn start(python: &Path, dir: &Path, frame: Arc<[u8]>) -> std::io::Result<TokioEcho> {
        let (child, sock) = start_echo(python, dir, "tokio.sock")?;
        sock.set_nonblocking(true)?;
        Ok(TokioEcho {
            sock: Some(tokio::net::UnixStream::from_std(sock)?),
            child,
            frame,
        })
    }

    async fn block(&mut self, rounds: usize) -> std::io::Result<Vec<Duration>> {
        let mut sock = self.sock.take().ok_or(std::io::Error::other("closed"))?;
        let frame = self.frame.clone();
        let (sock, times) = tokio::spawn(async move {
            let mut back = vec![0u8; frame.len()];
            let mut times = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                sock.write_all(&frame).await?;
                sock.read_exact(&mut back).await?;
                times.push(t.elapsed());
            }
            Ok::<_, std::io::Error>((sock, times))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.sock = Some(sock);
        Ok(times)
    }

    fn close(mut self) {
        self.sock = None;
        let _ = self.child.wait();
    }
}

/// The raw echoes, the protocol echo, then the pool (see [`bench::latency_summary`]).
const CONTENDERS: [&str; 4] = ["raw_blocking", "raw_tokio", "protocol_tokio", "pypool"];

/// The protocol's floor ([`bench::PROTOCOL_ECHO_SERVE`]) on a Unix socket, driven by a tokio
/// task.
struct ProtocolEcho {
    io: Option<(
        tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    )>,
    child: std::process::Child,
    next_id: u64,
    codec: Option<Codec>,
}

impl ProtocolEcho {
    fn start(python: &Path, dir: &Path) -> std::io::Result<ProtocolEcho> {
        let path = dir.join("protocol.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        let script = format!(
            "{}sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             sock.connect(sys.argv[1])\n\
             serve(functools.partial(sock.recv, 65536), sock.send)\n",
            bench::PROTOCOL_ECHO_SERVE
        );
        let child = std::process::Command::new(python)
            .args(["-c", &script])
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()?;
        let (sock, _) = listener.accept()?;
        sock.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(sock)?.into_split();
        Ok(ProtocolEcho {
            io: Some((tokio::io::BufReader::new(read), write)),
            child,
            next_id: 1,
            codec: None,
        })
    }

    async fn block(&mut self, rounds: usize) -> std::io::Result<Vec<Duration>> {
        let (mut read, mut write) = self.io.take().ok_or(std::io::Error::other("closed"))?;
        let first = self.next_id;
        self.next_id += rounds as u64;
        let codec = self.codec;
        let (io, (codec, times)) = tokio::spawn(async move {
            let out =
                bench::protocol_round_trips(&mut read, &mut write, codec, first, rounds).await?;
            Ok::<_, std::io::Error>(((read, write), out))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.io = Some(io);
        self.codec = Some(codec);
        Ok(times)
    }

    fn close(mut self) {
        self.io = None;
        let _ = self.child.wait();
    }
}

async fn measure_latency(
    o: &Options,
    pool: &Pool,
    python: &Path,
) -> Result<Value, Box<dyn std::error::Error>> {
    let frame: Arc<[u8]> = bench::call_sized_frame().into();
    let dir = tempfile::tempdir()?;
    let blocking = start_blocking_echo(python, dir.path(), frame.clone())?;
    let mut tokio_echo = TokioEcho::start(python, dir.path(), frame.clone())?;
    let mut protocol_echo = ProtocolEcho::start(python, dir.path())?;

    blocking.block(WARM_UP)?;
    tokio_echo.block(WARM_UP).await?;
    protocol_echo.block(WARM_UP).await?;
    bench::time_pool_block(pool, WARM_UP).await?;

    let blocks = o.round_trips.div_ceil(o.block);
    let mut figures = vec![Vec::new(); CONTENDERS.len()];
    let mut turn = 0;
    for _ in 0..o.repeat {
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); CONTENDERS.len()];
        for b in 0..blocks {
            let rounds = o.block.min(o.round_trips - b * o.block);
            for k in 0..CONTENDERS.len() {
                let which = (turn + k) % CONTENDERS.len();
                let times = match which {
                    0 => blocking.block(rounds)?,
                    1 => tokio_echo.block(rounds).await?,
                    2 => protocol_echo.block(rounds).await?,
                    _ => bench::time_pool_block(pool, rounds).await?,
                };
                samples[which].extend(times);
            }
            turn += 1;
        }
        for (which, s) in samples.iter_mut().enumerate() {
            figures[which].push(bench::round_trip_stats(s));
        }
    }
    drop(blocking);
    tokio_echo.close();
    protocol_echo.close();

    let (latency_us, pypool_mean_over) = bench::latency_summary(&CONTENDERS, &figures);
    Ok(json!({
        "frame_bytes": frame.len(),
        "round_trips_per_repeat": o.round_trips,
        "block": o.block,
        "warm_up": WARM_UP,
        "latency_us": latency_us,
        "pypool_mean_over": pypool_mean_over,
    }))
}

/// 64 MiB through the pool and through a raw socket, best of 5 each.
async fn measure_big(pool: &Pool, python: &Path) -> Result<Value, Box<dyn std::error::Error>> {
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

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raw.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let mut child = Command::new(python)
        .args(["-c", ECHO_SCRIPT])
        .arg(&path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (mut sock, _) = listener.accept().await?;
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
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default().as_secs_f64() * 1e3;
    Ok(json!({"bytes": BIG, "raw_best_ms": best(&raw_big), "pypool_best_ms": best(&pool_big)}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = options()?;
    let app_dir = tempfile::tempdir()?;
    let app = bench::write_bench_app(app_dir.path())?;
    let python = pool_process::ProcessLauncher::new()
        .interpreter(&pool_core::WorkerSpec::new("bench", "probe", app.clone()))
        .await?
        .executable;

    let config = PoolConfig::new(app.clone())
        .size(1)
        .call_timeout(Duration::from_secs(120));
    let pool = Pool::start(config, Arc::new(IpcLauncher::new())).await?;
    let mut report = json!({
        "transport": "ipc",
        "cpus_allowed": bench::cpus_allowed(),
        "python": python.display().to_string(),
        "repeat": o.repeat,
    });
    if o.latency {
        report["latency"] = measure_latency(&o, &pool, &python).await?;
    }
    if o.big {
        report["big"] = measure_big(&pool, &python).await?;
    }
    pool.shutdown(Duration::from_secs(5)).await;
    if o.json {
        println!("{report}");
        return Ok(());
    }

    println!(
        "ipc, interpreter {}, CPUs allowed: {}",
        python.display(),
        report["cpus_allowed"].as_str().unwrap_or("?")
    );
    if let Some(l) = report.get("latency") {
        println!();
        println!(
            "Latency: {} repeats of {} sequential round trips (blocks of {}, rotating), frame {} bytes, after {} warm-up ones. Median of the repeats (min–max).",
            o.repeat, o.round_trips, o.block, l["frame_bytes"], WARM_UP
        );
        println!();
        println!("| round trip (µs) | mean | p50 | p99 | pypool's mean / this |");
        println!("|---|---|---|---|---|");
        let names = [
            ("raw_blocking", "raw Unix-socket echo, blocking Rust I/O"),
            ("raw_tokio", "raw Unix-socket echo, tokio UnixStream"),
            (
                "protocol_tokio",
                "protocol echo (CALL decoded, handler called, RESULT encoded), tokio UnixStream",
            ),
            ("pypool", "pypool no-op call (ipc)"),
        ];
        let floor = &l["latency_us"]["floor"]["mean"];
        println!(
            "| floor: the faster raw echo of each repeat | {} | | | {} |",
            bench::fmt_figure(floor),
            bench::fmt_ratio(&l["pypool_mean_over"]["floor"])
        );
        for (key, name) in names {
            let f = &l["latency_us"][key];
            let vs = match key {
                "pypool" => "—".to_owned(),
                other => bench::fmt_ratio(&l["pypool_mean_over"][other]),
            };
            println!(
                "| {name} | {} | {} | {} | {vs} |",
                bench::fmt_figure(&f["mean"]),
                bench::fmt_figure(&f["p50"]),
                bench::fmt_figure(&f["p99"])
            );
        }
    }
    if let Some(b) = report.get("big") {
        let raw = b["raw_best_ms"].as_f64().unwrap_or(f64::NAN);
        let pooled = b["pypool_best_ms"].as_f64().unwrap_or(f64::NAN);
        let mib_s = |ms: f64| 2.0 * 64.0 / (ms / 1e3);
        println!();
        println!("| 64 MiB echo, best of 5 | time | MiB/s (both ways) | pypool slower by |");
        println!("|---|---|---|---|");
        println!(
            "| raw socket copy (floor) | {raw:.0} ms | {:.0} | 1.00 |",
            mib_s(raw)
        );
        println!(
            "| pypool echo (ipc) | {pooled:.0} ms | {:.0} | {:.2}x |",
            mib_s(pooled),
            pooled / raw
        );
    }
    Ok(())
}
