//! The zmq transport against plain pyzmq, measured in one run, over `ipc://` and over loopback
//! `tcp://`: sequential round trips of a message the size of a pypool no-op CALL.
//!
//! Rows, each with a Python peer in another process:
//! 1. **pyzmq ROUTER ↔ pyzmq DEALER** (the baseline): `pyzmq_pingpong.py`, blocking
//!    send/recv on both ends, no pypool at all;
//! 2. **zeromq crate ROUTER ↔ pyzmq DEALER**: the same echo peer, driven by a plain
//!    `zeromq::RouterSocket` from Rust;
//! 3. **pypool zmq channel ↔ pyzmq DEALER**: the [`ZmqLauncher`]'s channel (router task, link;
//!    on tcp the guard and signing) to a peer that joined like a worker and echoes with blocking
//!    send/recv;
//! 4. the same, the peer echoing through the runtime's channel (its lock and ZMQ_FD polling,
//!    which let one thread read while others write);
//! 5. **pypool no-op call**: a one-worker pool, the whole stack (pool, protocol, runtime).
//!
//! The machine is shared and noisy: a thread wake-up on an idle vCPU costs tens of µs, so the
//! same ping-pong takes 25 µs or 100 µs depending on what else runs. Every row therefore stays
//! set up for the whole run and they take turns in blocks of round trips (in a rotating
//! order), so each row sees the same mix of conditions; the figures are over all blocks.
//!
//! Run: `cargo run --release -p transport-zmq --example zmq_bench [BLOCKS] [BLOCK_SIZE]` with
//! `PYPOOL_TEST_PYTHON` (or `target/pyenv-test/bin/python`, which scripts/test.sh creates)
//! naming a Python with pyzmq. Prints Markdown tables for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use pool_core::{Channel, Pool, PoolConfig, WorkerSpec};
use pool_process::WorkerProcess;
use pool_testkit::bench;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use transport_zmq::ZmqLauncher;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WARM_UP: usize = 500;

#[derive(Clone, Copy)]
enum Kind {
    Ipc,
    Tcp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ipc => "ipc://",
            Kind::Tcp => "tcp:// (loopback)",
        }
    }
}

fn python() -> PathBuf {
    let python = std::env::var_os("PYPOOL_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv-test/bin/python")
        });
    let ok = std::process::Command::new(&python)
        .args(["-c", "import zmq"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import zmq: run scripts/test.sh or set PYPOOL_TEST_PYTHON",
        python.display()
    );
    python
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The body of a no-op CALL, as the pool sends it (without the byte-stream length prefix).
fn call_body() -> Bytes {
    Bytes::from(bench::call_sized_frame()[4..].to_vec())
}

/// A copy of the embedded runtime whose `__main__` is the bench's echo peer.
fn echo_runtime(dir: &Path) -> std::io::Result<PathBuf> {
    let root = dir.join("echo-runtime");
    let package = root.join(pool_process::runtime::PACKAGE);
    std::fs::create_dir_all(&package)?;
    for (name, contents) in pool_process::runtime::FILES {
        let contents = if *name == "__main__.py" {
            include_str!("bench_echo_main.py")
        } else {
            contents
        };
        std::fs::write(package.join(name), contents)?;
    }
    Ok(root)
}

fn launcher(kind: Kind) -> ZmqLauncher {
    match kind {
        Kind::Ipc => ZmqLauncher::new(),
        Kind::Tcp => ZmqLauncher::new().bind_tcp("127.0.0.1:0"),
    }
}

/// One row: something that can time a block of round trips.
enum Row {
    Pyzmq {
        child: Child,
        stdin: ChildStdin,
        stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    },
    Crate {
        socket: RouterSocket,
        identity: Bytes,
        body: Bytes,
        child: Child,
    },
    Channel {
        channel: Channel,
        process: WorkerProcess,
        launcher: ZmqLauncher,
        body: Bytes,
    },
    Calls {
        pool: Pool,
    },
}

impl Row {
    async fn pyzmq(python: &Path, kind: Kind, dir: &Path, size: usize) -> Result<Row> {
        let endpoint = match kind {
            Kind::Ipc => format!("ipc://{}", dir.join("pyzmq.sock").display()),
            Kind::Tcp => "tcp://127.0.0.1:*".to_owned(),
        };
        let mut child = Command::new(python)
            .arg(example("pyzmq_pingpong.py"))
            .args(["blocks", &endpoint, &size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("stdout")?).lines();
        stdout
            .next_line()
            .await?
            .ok_or("the pyzmq driver did not start")?;
        Ok(Row::Pyzmq {
            child,
            stdin,
            stdout,
        })
    }

    async fn zeromq_crate(python: &Path, kind: Kind, dir: &Path, body: Bytes) -> Result<Row> {
        let mut socket = RouterSocket::new();
        let endpoint = match kind {
            Kind::Ipc => format!("ipc://{}", dir.join("crate.sock").display()),
            Kind::Tcp => "tcp://127.0.0.1:0".to_owned(),
        };
        let endpoint = socket.bind(&endpoint).await?.to_string();
        let child = Command::new(python)
            .arg(example("pyzmq_pingpong.py"))
            .args(["echo", &endpoint, "echo-peer"])
            .kill_on_drop(true)
            .spawn()?;
        let ready = socket.recv().await?;
        let identity = ready.get(0).cloned().ok_or("no identity")?;
        Ok(Row::Crate {
            socket,
            identity,
            body,
            child,
        })
    }

    async fn channel(
        python: &Path,
        kind: Kind,
        runtime: &Path,
        mode: &str,
        body: Bytes,
    ) -> Result<Row> {
        let launcher = launcher(kind);
        let mut spec = WorkerSpec::new("bench", "w1", "unused");
        spec.python = python.to_path_buf();
        spec.env.insert(
            "PYTHONPATH".to_owned(),
            runtime.to_string_lossy().into_owned(),
        );
        spec.env
            .insert("PYPOOL_BENCH_ECHO".to_owned(), mode.to_owned());
        let (channel, process) = launcher.launch_process(&spec).await?;
        Ok(Row::Channel {
            channel,
            process,
            launcher,
            body,
        })
    }

    async fn calls(python: &Path, kind: Kind, app: &str) -> Result<Row> {
        let config = PoolConfig::new(app)
            .size(1)
            .python(python)
            .call_timeout(Duration::from_secs(120));
        let pool = Pool::start(config, Arc::new(launcher(kind))).await?;
        Ok(Row::Calls { pool })
    }

    /// Times `n` sequential round trips, in µs.
    async fn block(&mut self, n: usize) -> Result<Vec<u64>> {
        let mut samples = Vec::with_capacity(n);
        match self {
            Row::Pyzmq { stdin, stdout, .. } => {
                stdin.write_all(format!("{n}\n").as_bytes()).await?;
                let line = stdout.next_line().await?.ok_or("the pyzmq driver ended")?;
                samples = serde_json::from_str(&line)?;
            }
            Row::Crate {
                socket,
                identity,
                body,
                ..
            } => {
                for _ in 0..n {
                    let mut message = ZmqMessage::from(identity.clone());
                    message.push_back(body.clone());
                    let t = Instant::now();
                    socket.send(message).await?;
                    socket.recv().await?;
                    samples.push(t.elapsed().as_micros() as u64);
                }
            }
            Row::Channel { channel, body, .. } => {
                for _ in 0..n {
                    let t = Instant::now();
                    channel.sender.send(body.clone()).await?;
                    if channel.receiver.recv().await?.is_none() {
                        return Err("the echo peer went away".into());
                    }
                    samples.push(t.elapsed().as_micros() as u64);
                }
            }
            Row::Calls { pool } => {
                for _ in 0..n {
                    let t = Instant::now();
                    pool.call("echo", bench::noop_args()).await?;
                    samples.push(t.elapsed().as_micros() as u64);
                }
            }
        }
        Ok(samples)
    }

    async fn finish(self) -> Result<()> {
        match self {
            Row::Pyzmq {
                mut child, stdin, ..
            } => {
                drop(stdin);
                child.wait().await?;
            }
            Row::Crate {
                mut socket,
                identity,
                mut child,
                ..
            } => {
                let mut stop = ZmqMessage::from(identity);
                stop.push_back(Bytes::from_static(b"stop"));
                socket.send(stop).await?;
                child.wait().await?;
            }
            Row::Channel {
                channel,
                process,
                launcher,
                ..
            } => {
                drop(channel);
                pool_core::ProcessHandle::kill(&process);
                pool_core::ProcessHandle::wait(&process).await;
                pool_core::Launcher::shutdown(&launcher).await;
            }
            Row::Calls { pool } => pool.shutdown(Duration::from_secs(5)).await,
        }
        Ok(())
    }
}

const NAMES: [&str; 5] = [
    "pyzmq ROUTER ↔ pyzmq DEALER (baseline)",
    "zeromq crate ROUTER ↔ pyzmq DEALER",
    "pypool zmq channel ↔ pyzmq DEALER, blocking echo",
    "pypool zmq channel ↔ the runtime's channel (lock + ZMQ_FD poll)",
    "pypool no-op call (zmq, whole stack)",
];

async fn measure(
    kind: Kind,
    python: &Path,
    dir: &Path,
    runtime: &Path,
    app: &str,
    blocks: usize,
    block: usize,
) -> Result<Vec<Histogram<u64>>> {
    let body = call_body();
    let mut rows = vec![
        Row::pyzmq(python, kind, dir, body.len()).await?,
        Row::zeromq_crate(python, kind, dir, body.clone()).await?,
        Row::channel(python, kind, runtime, "plain", body.clone()).await?,
        Row::channel(python, kind, runtime, "channel", body.clone()).await?,
        Row::calls(python, kind, app).await?,
    ];
    for row in &mut rows {
        row.block(WARM_UP).await?;
    }
    let mut histograms: Vec<Histogram<u64>> = rows.iter().map(|_| bench::histogram()).collect();
    for b in 0..blocks {
        for i in 0..rows.len() {
            let r = (b + i) % rows.len();
            for sample in rows[r].block(block).await? {
                histograms[r].saturating_record(sample.max(1));
            }
        }
    }
    for row in rows {
        row.finish().await?;
    }
    Ok(histograms)
}

fn print_table(kind: Kind, histograms: &[Histogram<u64>]) {
    let base = histograms[0].mean();
    println!("{}:", kind.name());
    println!();
    println!("| round trip (µs) | mean | p50 | p99 | mean / pyzmq |");
    println!("|---|---|---|---|---|");
    for (name, h) in NAMES.iter().zip(histograms) {
        println!(
            "| {name} | {:.1} | {} | {} | {:.2} |",
            h.mean(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.mean() / base
        );
    }
    println!();
}

#[tokio::main]
async fn main() -> Result<()> {
    let blocks: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let block: usize = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let python = python();
    let dir = tempfile::tempdir()?;
    let app = bench::write_bench_app(dir.path())?;
    let runtime = echo_runtime(dir.path())?;
    println!(
        "{blocks} blocks of {block} sequential round trips per row, rows taking turns (after \
         {WARM_UP} warm-up each); message {} bytes; interpreter {}",
        call_body().len(),
        python.display()
    );
    println!();
    for kind in [Kind::Ipc, Kind::Tcp] {
        // On a runtime worker, as a service's request handler would be (the main thread's
        // `block_on` is not a worker: every wake-up to and from it crosses threads).
        let (python, dir, runtime, app) = (
            python.clone(),
            dir.path().to_path_buf(),
            runtime.clone(),
            app.clone(),
        );
        let histograms = tokio::spawn(async move {
            measure(kind, &python, &dir, &runtime, &app, blocks, block).await
        })
        .await??;
        print_table(kind, &histograms);
    }
    Ok(())
}
