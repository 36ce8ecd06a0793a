//! `pypool bench --baseline`: the same workload on the raw channel and on Python's own pools.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pypool::process::ProcessLauncher;
use pypool::WorkerSpec;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use crate::assets::{Assets, PYTHON_POOLS, RAW_ECHO};
use crate::bench::Workload;
use crate::measure::{drive, Measurement};
use crate::ui::{Failure, Ui};
use crate::Global;

/// pypool's figures divided by a baseline's: above 1 for throughput, below 1 for latency means
/// pypool is faster. `null` when the baseline's figure is 0.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub throughput: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// One baseline's measurement and how pypool compares to it.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub description: &'static str,
    #[serde(flatten)]
    pub measurement: Measurement,
    pub pypool_ratio: Ratios,
}

/// Every baseline, under the `baselines` key of `pypool bench --baseline --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    pub raw_floor: Compared,
    pub multiprocessing_pool: Compared,
    pub process_pool_executor: Compared,
}

impl Baselines {
    /// The baselines with their display names, in order.
    pub fn named(&self) -> [(&'static str, &Compared); 3] {
        [
            ("raw floor", &self.raw_floor),
            ("multiprocessing.Pool", &self.multiprocessing_pool),
            ("ProcessPoolExecutor", &self.process_pool_executor),
        ]
    }
}

fn ratio(pypool: f64, baseline: f64) -> Option<f64> {
    (baseline > 0.0).then(|| ((pypool / baseline) * 1000.0).round() / 1000.0)
}

fn compare(description: &'static str, measurement: Measurement, pypool: &Measurement) -> Compared {
    Compared {
        description,
        pypool_ratio: Ratios {
            throughput: ratio(pypool.throughput_per_s, measurement.throughput_per_s),
            p50: ratio(
                pypool.latency_us.p50 as f64,
                measurement.latency_us.p50 as f64,
            ),
            p99: ratio(
                pypool.latency_us.p99 as f64,
                measurement.latency_us.p99 as f64,
            ),
        },
        measurement,
    }
}

/// Runs the three baselines one after the other with the pool's interpreter.
pub async fn run_all(
    ui: &Ui,
    global: &Global,
    transport: &str,
    assets: &Assets,
    w: Workload,
    pypool: &Measurement,
) -> Result<Baselines, Failure> {
    let mut spec = WorkerSpec::new("bench-baseline", "probe", "");
    spec.python = global.python.clone();
    let interpreter = ProcessLauncher::new()
        .interpreter(&spec)
        .await
        .map_err(|err| Failure::start(err.to_string()))?;
    let python = interpreter.executable.as_path();

    let raw = raw_floor(ui, python, &assets.path(RAW_ECHO.0), transport, w).await?;
    let script = assets.path(PYTHON_POOLS.0);
    let mp = python_pool(
        ui,
        python,
        &script,
        "multiprocessing",
        "multiprocessing.Pool",
        w,
    )
    .await?;
    let ex = python_pool(ui, python, &script, "executor", "ProcessPoolExecutor", w).await?;
    Ok(Baselines {
        raw_floor: compare(
            if transport == "ipc" {
                "WORKERS Python processes echoing length-prefixed frames over a Unix socket each, one frame at a time, driven directly from Rust by CONCURRENCY callers spread over them: no protocol, no auth, no pool"
            } else {
                "WORKERS Python processes echoing length-prefixed frames over stdin/stdout, one frame at a time each, driven directly from Rust (tokio::process) by CONCURRENCY callers spread over them: no protocol, no pool"
            },
            raw,
            pypool,
        ),
        multiprocessing_pool: compare(
            "multiprocessing.Pool(WORKERS), CONCURRENCY caller threads doing pool.apply(echo, (payload,))",
            mp,
            pypool,
        ),
        process_pool_executor: compare(
            "concurrent.futures.ProcessPoolExecutor(WORKERS), CONCURRENCY caller threads doing submit(echo, payload).result()",
            ex,
            pypool,
        ),
    })
}

/// One echo process, used by one caller at a time: a strict ping-pong, like a pool worker that
/// takes one call at a time.
struct Echo {
    io: tokio::sync::Mutex<Option<EchoIo>>,
}

struct EchoIo {
    stdin: Box<dyn AsyncWrite + Unpin + Send>,
    stdout: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    body: Vec<u8>,
}

impl Echo {
    /// Sends one frame and waits for its echo; returns the echoed body's length.
    async fn round_trip(&self, frame: &[u8]) -> Result<usize, String> {
        let mut io = self.io.lock().await;
        let Some(io) = io.as_mut() else {
            return Err("the echo process was closed".to_owned());
        };
        let gone = |err: std::io::Error| format!("the echo process failed: {err}");
        io.stdin.write_all(frame).await.map_err(gone)?;
        let mut head = [0u8; 4];
        io.stdout.read_exact(&mut head).await.map_err(gone)?;
        let len = u32::from_be_bytes(head) as usize;
        io.body.resize(len, 0);
        io.stdout.read_exact(&mut io.body).await.map_err(gone)?;
        Ok(len)
    }
}

/// The physical floor: `workers` Python processes echoing frames over the transport's kind of
/// channel (their pipes for stdio, a Unix socket each for ipc), each serving one caller at a time,
/// driven straight from Rust: no protocol, no pool. Callers are spread over the processes and
/// queue for theirs.
async fn raw_floor(
    ui: &Ui,
    python: &Path,
    script: &Path,
    transport: &str,
    w: Workload,
) -> Result<Measurement, Failure> {
    let spinner = ui.spinner(format!("raw floor: starting {} echo processes", w.workers));
    let t0 = Instant::now();
    let socket_dir = tempfile::tempdir()
        .map_err(|err| Failure::start(format!("cannot create a socket directory: {err}")))?;
    let socket_path = socket_dir.path().join("floor.sock");
    let listener = if transport == "ipc" {
        let listener = tokio::net::UnixListener::bind(&socket_path)
            .map_err(|err| Failure::start(format!("cannot listen on a Unix socket: {err}")))?;
        Some(listener)
    } else {
        None
    };
    let mut children: Vec<Child> = Vec::with_capacity(w.workers);
    let mut echoes = Vec::with_capacity(w.workers);
    for _ in 0..w.workers {
        let mut command = Command::new(python);
        command
            .arg(script)
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        match &listener {
            Some(_) => command
                .arg("--socket")
                .arg(&socket_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            None => command.stdin(Stdio::piped()).stdout(Stdio::piped()),
        };
        let mut child = command
            .spawn()
            .map_err(|err| Failure::start(format!("cannot start `{}`: {err}", python.display())))?;
        let (writer, reader): (
            Box<dyn AsyncWrite + Unpin + Send>,
            Box<dyn AsyncRead + Unpin + Send>,
        ) = match &listener {
            Some(listener) => {
                let (stream, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
                    .await
                    .map_err(|_| Failure::start("an echo process did not connect within 30 s"))?
                    .map_err(|err| Failure::start(format!("accept failed: {err}")))?;
                let (read, write) = stream.into_split();
                (Box::new(write), Box::new(read))
            }
            None => {
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err(Failure::failed("the echo process has no pipes"));
                };
                (Box::new(stdin), Box::new(stdout))
            }
        };
        echoes.push(Echo {
            io: tokio::sync::Mutex::new(Some(EchoIo {
                stdin: writer,
                stdout: BufReader::with_capacity(64 * 1024, reader),
                body: Vec::new(),
            })),
        });
        children.push(child);
    }
    let echoes = Arc::new(echoes);
    // Ready = every process has echoed one frame.
    let mut ready = JoinSet::new();
    for i in 0..echoes.len() {
        let echoes = echoes.clone();
        ready.spawn(async move { echoes[i].round_trip(&[0, 0, 0, 1, b'x']).await });
    }
    while let Some(done) = ready.join_next().await {
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(Failure::start(format!("raw floor baseline: {err}"))),
            Err(err) => return Err(Failure::failed(format!("raw floor baseline: {err}"))),
        }
    }
    let startup = t0.elapsed();
    spinner.finish_and_clear();

    let len = u32::try_from(w.payload)
        .map_err(|_| Failure::usage("the payload is too large for one frame"))?;
    let mut frame = Vec::with_capacity(4 + w.payload);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.resize(4 + w.payload, b'x');
    let frame: Arc<[u8]> = frame.into();
    let expected = w.payload;
    let bar = ui.bar(w.calls, "raw floor");
    let caller_echoes = echoes.clone();
    let workers = w.workers;
    let driven = drive(w.concurrency, w.calls, &bar, move |caller| {
        let echoes = caller_echoes.clone();
        let frame = frame.clone();
        async move {
            match echoes[caller % workers].round_trip(&frame).await {
                Ok(n) if n == expected => Ok(()),
                Ok(n) => Err(format!("echoed {n} bytes instead of {expected}")),
                Err(err) => Err(err),
            }
        }
    })
    .await;
    bar.finish_and_clear();

    // Close every channel: the scripts exit at end of file.
    for echo in echoes.iter() {
        echo.io.lock().await.take();
    }
    for mut child in children {
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    Ok(driven.measurement(startup))
}

/// One of Python's pools, run by `python_pools.py`, which prints one JSON line.
async fn python_pool(
    ui: &Ui,
    python: &Path,
    script: &Path,
    kind: &str,
    label: &str,
    w: Workload,
) -> Result<Measurement, Failure> {
    let spinner = ui.spinner(format!(
        "{label}: {} workers, {} callers, {} calls",
        w.workers, w.concurrency, w.calls
    ));
    let output = Command::new(python)
        .arg(script)
        .args(["--kind", kind])
        .args(["--workers", &w.workers.to_string()])
        .args(["--concurrency", &w.concurrency.to_string()])
        .args(["--calls", &w.calls.to_string()])
        .args(["--payload", &w.payload.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    spinner.finish_and_clear();
    let output = output
        .map_err(|err| Failure::start(format!("cannot run `{}`: {err}", python.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Failure::failed(format!(
            "the {label} baseline failed ({}):\n{}",
            output.status,
            tail.join("\n")
        )));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .ok_or_else(|| Failure::failed(format!("the {label} baseline printed no result")))?;
    serde_json::from_str(line).map_err(|err| {
        Failure::failed(format!(
            "the {label} baseline printed an unreadable result ({err}): {line}"
        ))
    })
}
