//! The stdio transport against its physical floor, measured in one run:
//!
//! 1. **Latency**: one caller making sequential no-op calls through a one-worker pool, next to a
//!    raw Rust-to-Python length-prefixed pipe echo of a frame as large as the pool's CALL (no
//!    pool, no protocol). The Python side of the echo is the least a process can do per frame:
//!    `os.read` what arrived, find the frame by its length, `os.write` it back. The Rust side is
//!    measured twice: blocking `std` I/O from a dedicated thread (the floor) and tokio pipes
//!    from a runtime task (what an async service has to work with). A third echo does what
//!    the wire protocol itself requires and nothing more (the CALL's JSON header decoded, the
//!    handler it names called, the RESULT encoded, on both sides), driven by tokio: the floor
//!    of any pool that speaks this protocol over async pipes. All four stay set up for
//!    the whole run and take turns in blocks of `--block` round trips, in a rotating order,
//!    after the same warm-up, so that each sees the same machine; each repeat gives every
//!    contender the same number of round trips.
//! 2. **Start-up**: time until 32 pool workers are ready (handshake done), next to 32 bare
//!    interpreters started at once answering one ping, alternating, after one untimed round of
//!    each (so one-time costs such as writing the embedded runtime to disk are left out of
//!    both).
//!
//! Run: `cargo run --release -p transport-stdio --example stdio_bench -- [OPTIONS]`; to pin
//! the whole process tree to one CPU: `taskset -c 0 target/release/examples/stdio_bench`.
//! Options: `--round-trips N` per repeat (5000), `--block N` (200), `--repeat N` (3),
//! `--startup-runs N` (5), `--startup-workers N` (32), `--only latency|startup`, `--json`
//! (one JSON object on stdout instead of Markdown tables). `--only pool-calls` makes only
//! pypool's sequential calls (`--round-trips` x `--repeat`), nothing else: for profilers.
//!
//! Every figure is the median over the repeats with its range; a ratio is pypool's figure
//! divided by the floor's within one repeat (above 1: pypool is slower by that factor). The
//! floor of a repeat is the faster of the two raw echoes in it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::protocol::Codec;
use pool_core::{Pool, PoolConfig, WorkerSpec};
use pool_testkit::bench;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use transport_stdio::StdioLauncher;

/// The raw echo: read what arrived, write back every complete length-prefixed frame.
const ECHO_SCRIPT: &str = r#"
import os

def serve(read=os.read, write=os.write):  # locals, not globals: the least work per frame
    buf = b""
    while True:
        data = read(0, 65536)
        if not data:
            return
        buf = buf + data if buf else data
        end, size = 0, len(buf)
        while size - end >= 4:
            frame = 4 + int.from_bytes(buf[end:end + 4], "big")
            if size - end < frame:
                break
            end += frame
        if end:
            out = memoryview(buf)[:end]
            while out:
                out = out[write(1, out):]
            buf = buf[end:]

serve()
"#;

const PING_SCRIPT: &str = "import sys\nsys.stdin.readline()\nprint('pong', flush=True)\n";

const WARM_UP: usize = 200;

struct Options {
    round_trips: usize,
    block: usize,
    repeat: usize,
    startup_runs: usize,
    startup_workers: usize,
    latency: bool,
    startup: bool,
    /// Only pypool's sequential calls, nothing else in the process: for profilers.
    pool_only: bool,
    json: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        round_trips: 5000,
        block: 200,
        repeat: 3,
        startup_runs: 5,
        startup_workers: 32,
        latency: true,
        startup: true,
        pool_only: false,
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
            "--startup-runs" => o.startup_runs = number()?,
            "--startup-workers" => o.startup_workers = number()?,
            "--json" => o.json = true,
            "--only" => match args.next().as_deref() {
                Some("latency") => o.startup = false,
                Some("startup") => o.latency = false,
                Some("pool-calls") => o.pool_only = true,
                _ => return Err("--only takes latency, startup or pool-calls".into()),
            },
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// The floor's echo process on pipes, driven with blocking `std` I/O from a thread.
fn start_blocking_echo(
    python: &std::path::Path,
    frame: Arc<[u8]>,
) -> std::io::Result<bench::BlockingEcho> {
    let mut child = std::process::Command::new(python)
        .args(["-c", ECHO_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or(std::io::Error::other("no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or(std::io::Error::other("no stdout"))?;
    Ok(bench::BlockingEcho::spawn(child, stdin, stdout, frame))
}

/// `python -c script` on tokio pipes, killed when dropped.
fn spawn_script(
    python: &std::path::Path,
    script: &str,
) -> std::io::Result<(
    tokio::process::Child,
    tokio::process::ChildStdin,
    tokio::process::ChildStdout,
)> {
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or(std::io::Error::other("no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or(std::io::Error::other("no stdout"))?;
    Ok((child, stdin, stdout))
}

/// A raw echo driven through tokio's pipes from a runtime task.
struct TokioEcho {
    io: Option<(tokio::process::ChildStdin, tokio::process::ChildStdout)>,
    child: tokio::process::Child,
    frame: Arc<[u8]>,
}

impl TokioEcho {
    fn start(python: &std::path::Path, frame: Arc<[u8]>) -> std::io::Result<TokioEcho> {
        let (child, stdin, stdout) = spawn_script(python, ECHO_SCRIPT)?;
        Ok(TokioEcho {
            io: Some((stdin, stdout)),
            child,
            frame,
        })
    }

    async fn block(&mut self, rounds: usize) -> std::io::Result<Vec<Duration>> {
        let (mut stdin, mut stdout) = self.io.take().ok_or(std::io::Error::other("closed"))?;
        let frame = self.frame.clone();
        let (io, times) = tokio::spawn(async move {
            let mut back = vec![0u8; frame.len()];
            let mut times = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                stdin.write_all(&frame).await?;
                stdout.read_exact(&mut back).await?;
                times.push(t.elapsed());
            }
            Ok::<_, std::io::Error>(((stdin, stdout), times))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.io = Some(io);
        Ok(times)
    }

    async fn close(mut self) {
        self.io = None;
        let _ = self.child.wait().await;
    }
}

/// The raw echoes, the protocol echo, then the pool (see [`bench::latency_summary`]).
const CONTENDERS: [&str; 4] = ["raw_blocking", "raw_tokio", "protocol_tokio", "pypool"];

/// The protocol's floor ([`bench::PROTOCOL_ECHO_SERVE`]) on pipes, driven by a tokio task.
struct ProtocolEcho {
    io: Option<(
        tokio::process::ChildStdin,
        BufReader<tokio::process::ChildStdout>,
    )>,
    child: tokio::process::Child,
    next_id: u64,
    codec: Option<Codec>,
}

impl ProtocolEcho {
    fn start(python: &std::path::Path) -> std::io::Result<ProtocolEcho> {
        let script = format!(
            "{}serve(functools.partial(os.read, 0, 65536), functools.partial(os.write, 1))\n",
            bench::PROTOCOL_ECHO_SERVE
        );
        let (child, stdin, stdout) = spawn_script(python, &script)?;
        Ok(ProtocolEcho {
            io: Some((stdin, BufReader::new(stdout))),
            child,
            next_id: 1,
            codec: None,
        })
    }

    async fn block(&mut self, rounds: usize) -> std::io::Result<Vec<Duration>> {
        let (mut stdin, mut stdout) = self.io.take().ok_or(std::io::Error::other("closed"))?;
        let first = self.next_id;
        self.next_id += rounds as u64;
        let codec = self.codec;
        let (io, (codec, times)) = tokio::spawn(async move {
            let out =
                bench::protocol_round_trips(&mut stdout, &mut stdin, codec, first, rounds).await?;
            Ok::<_, std::io::Error>(((stdin, stdout), out))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.io = Some(io);
        self.codec = Some(codec);
        Ok(times)
    }

    async fn close(mut self) {
        self.io = None;
        let _ = self.child.wait().await;
    }
}

async fn measure_latency(
    o: &Options,
    app: &str,
    python: &std::path::Path,
    launcher: Arc<StdioLauncher>,
) -> Result<Value, Box<dyn std::error::Error>> {
    let frame: Arc<[u8]> = bench::call_sized_frame().into();
    let pool = Pool::start(PoolConfig::new(app).size(1), launcher).await?;
    let blocking = start_blocking_echo(python, frame.clone())?;
    let mut tokio_echo = TokioEcho::start(python, frame.clone())?;
    let mut protocol_echo = ProtocolEcho::start(python)?;

    blocking.block(WARM_UP)?;
    tokio_echo.block(WARM_UP).await?;
    protocol_echo.block(WARM_UP).await?;
    bench::time_pool_block(&pool, WARM_UP).await?;

    let blocks = o.round_trips.div_ceil(o.block);
    // per contender, per repeat: [mean, p50, p99]
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
                    _ => bench::time_pool_block(&pool, rounds).await?,
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
    tokio_echo.close().await;
    protocol_echo.close().await;
    pool.shutdown(Duration::from_secs(5)).await;

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

/// `n` bare interpreters started at once, each answering one ping: time until all answered.
async fn bare_start(python: &std::path::Path, n: usize) -> std::io::Result<Duration> {
    let t = Instant::now();
    let pings = (0..n).map(|_| async move {
        let mut child = Command::new(python)
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
        if line.trim() != "pong" {
            return Err(std::io::Error::other(format!("answered {line:?}")));
        }
        Ok::<_, std::io::Error>(child)
    });
    let children = futures::future::try_join_all(pings).await?;
    let ready = t.elapsed();
    for mut child in children {
        child.wait().await?;
    }
    Ok(ready)
}

async fn pool_start(
    app: &str,
    n: usize,
    launcher: Arc<StdioLauncher>,
) -> Result<Duration, pool_core::Error> {
    let t = Instant::now();
    let pool = Pool::start(PoolConfig::new(app).size(n), launcher).await?;
    let ready = t.elapsed();
    pool.shutdown(Duration::from_secs(5)).await;
    Ok(ready)
}

async fn measure_startup(
    o: &Options,
    app: &str,
    python: &std::path::Path,
    launcher: Arc<StdioLauncher>,
) -> Result<Value, Box<dyn std::error::Error>> {
    let n = o.startup_workers;
    // One untimed round of each: the runtime is written and byte-compiled, caches are warm.
    pool_start(app, n, launcher.clone()).await?;
    bare_start(python, n).await?;
    let (mut pool_ms, mut bare_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..o.startup_runs {
        let (pool, bare) = if run % 2 == 0 {
            let p = pool_start(app, n, launcher.clone()).await?;
            (p, bare_start(python, n).await?)
        } else {
            let b = bare_start(python, n).await?;
            (pool_start(app, n, launcher.clone()).await?, b)
        };
        pool_ms.push(pool.as_secs_f64() * 1e3);
        bare_ms.push(bare.as_secs_f64() * 1e3);
        ratios.push(pool.as_secs_f64() / bare.as_secs_f64());
    }
    Ok(json!({
        "workers": n,
        "runs": o.startup_runs,
        "bare_ms": bench::figure(&bare_ms),
        "pypool_ms": bench::figure(&pool_ms),
        "pypool_over_bare": bench::figure(&ratios),
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = options()?;
    let app_dir = tempfile::tempdir()?;
    let app = bench::write_bench_app(app_dir.path())?;
    let launcher = Arc::new(StdioLauncher::new());
    let python = launcher
        .processes()
        .interpreter(&WorkerSpec::new("bench", "probe", app.clone()))
        .await?
        .executable;

    let mut report = json!({
        "transport": "stdio",
        "cpus_allowed": bench::cpus_allowed(),
        "python": python.display().to_string(),
        "repeat": o.repeat,
    });
    if o.pool_only {
        let pool = Pool::start(PoolConfig::new(app.clone()).size(1), launcher).await?;
        bench::time_pool_block(&pool, WARM_UP).await?;
        let mut times = bench::time_pool_block(&pool, o.round_trips * o.repeat).await?;
        pool.shutdown(Duration::from_secs(5)).await;
        let [mean, p50, p99] = bench::round_trip_stats(&mut times);
        println!("pypool no-op call (stdio), {} sequential: mean {mean:.1} µs, p50 {p50:.1} µs, p99 {p99:.1} µs", times.len());
        return Ok(());
    }
    if o.latency {
        report["latency"] = measure_latency(&o, &app, &python, launcher.clone()).await?;
    }
    if o.startup {
        report["startup"] = measure_startup(&o, &app, &python, launcher.clone()).await?;
    }
    if o.json {
        println!("{report}");
        return Ok(());
    }

    println!(
        "stdio, interpreter {}, CPUs allowed: {}",
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
            ("raw_blocking", "raw pipe echo, blocking Rust I/O"),
            ("raw_tokio", "raw pipe echo, tokio pipes"),
            (
                "protocol_tokio",
                "protocol echo (CALL decoded, handler called, RESULT encoded), tokio pipes",
            ),
            ("pypool", "pypool no-op call (stdio)"),
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
    if let Some(s) = report.get("startup") {
        println!();
        println!(
            "Start-up: {} workers, {} runs alternating (after one untimed run of each). Median (min–max).",
            s["workers"], s["runs"]
        );
        println!();
        println!("| start-up (ms) | time | / bare |");
        println!("|---|---|---|");
        println!(
            "| {} bare interpreters answer one ping | {} | 1.00 |",
            s["workers"],
            bench::fmt_figure(&s["bare_ms"])
        );
        println!(
            "| pypool: {} workers ready (handshake done) | {} | {} |",
            s["workers"],
            bench::fmt_figure(&s["pypool_ms"]),
            bench::fmt_ratio(&s["pypool_over_bare"])
        );
    }
    Ok(())
}
