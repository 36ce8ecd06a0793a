//! `pypool bench --baseline`: the same workload on the raw channel and on Python's own pools.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pypool::process::ProcessLauncher;
use pypool::WorkerSpec;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::assets::{Assets, PYTHON_POOLS, RAW_ECHO};
use crate::measure::Workload;
use crate::measure::{drive, Measurement, Speedup, Summary};
use crate::ui::{Failure, Ui};
use crate::Global;

/// How a baseline runs the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Raw length-prefixed echo processes driven from Rust.
    RawFloor,
    /// `python_pools.py --kind KIND [--chunksize N]`.
    Python {
        kind: &'static str,
        chunksize: Option<u64>,
    },
}

/// One baseline: what it is and how to run it.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// Its key under `baselines` in the JSON output.
    pub id: &'static str,
    /// Its name in the tables.
    pub label: String,
    /// What exactly runs.
    pub description: String,
    kind: Kind,
}

/// The chunksize `multiprocessing.Pool.map` computes for `items` items on `workers` processes
/// (`python_pools.py` computes the same; this copy only names it in the labels).
pub fn auto_chunksize(items: u64, workers: usize) -> u64 {
    let per = (workers as u64 * 4).max(1);
    items.div_ceil(per).max(1)
}

/// Every baseline for a workload, in the order they are shown: the floor, then Python's pools
/// from the batch-job uses (the strongest) to the service-like ones.
pub fn all(transport: &str, w: Workload) -> Vec<Baseline> {
    let auto = auto_chunksize(w.calls, w.workers);
    let item = if w.payload == 0 {
        "`f(i)` returning i, over range(CALLS)".to_owned()
    } else {
        format!(
            "`f(b)` returning b, over CALLS {}-byte bytes objects",
            w.payload
        )
    };
    let floor_frame = if w.payload == 0 {
        "an 8-byte body (the no-op's small int, without any protocol)".to_owned()
    } else {
        format!("a {}-byte body", w.payload)
    };
    vec![
        Baseline {
            id: "raw_floor",
            label: if transport == "ipc" {
                "raw floor (Unix sockets)".to_owned()
            } else {
                "raw floor (pipes)".to_owned()
            },
            description: format!(
                "WORKERS Python processes echoing length-prefixed frames with {floor_frame} over {}; each reads all that has arrived and writes back every complete frame with one write. Driven directly from Rust by CONCURRENCY callers spread over them, each process with as many frames in flight as its callers send (pipelined, like pypool's prefetch): no protocol, no pool",
                if transport == "ipc" {
                    "a Unix socket each (no auth)"
                } else {
                    "stdin/stdout (tokio::process pipes)"
                }
            ),
            kind: Kind::RawFloor,
        },
        Baseline {
            id: "imap_unordered_chunksize_1",
            label: "Pool.imap_unordered, chunksize 1".to_owned(),
            description: format!(
                "multiprocessing.Pool(WORKERS).imap_unordered(f, items, chunksize=1) ({item}): one task per item, imap_unordered's default"
            ),
            kind: Kind::Python {
                kind: "imap_unordered",
                chunksize: Some(1),
            },
        },
        Baseline {
            id: "imap_unordered_auto_chunksize",
            label: format!("Pool.imap_unordered, chunksize {auto} (auto)"),
            description: format!(
                "multiprocessing.Pool(WORKERS).imap_unordered(f, items, chunksize={auto}) ({item}): the chunksize Pool.map computes for this input, ceil(CALLS / (4 * WORKERS)), applied to imap_unordered so that only the chunksize differs from the chunksize-1 row"
            ),
            kind: Kind::Python {
                kind: "imap_unordered",
                chunksize: Some(auto),
            },
        },
        Baseline {
            id: "executor_map",
            label: format!("Executor.map, chunksize {auto}"),
            description: format!(
                "concurrent.futures.ProcessPoolExecutor(WORKERS).map(f, items, chunksize={auto}) ({item}): the same automatic chunksize as Pool.map (the executor's own default, 1, is its slowest way to run a batch)"
            ),
            kind: Kind::Python {
                kind: "executor_map",
                chunksize: Some(auto),
            },
        },
        Baseline {
            id: "pool_apply_threads",
            label: format!("Pool.apply from {} threads", w.concurrency),
            description: format!(
                "multiprocessing.Pool(WORKERS), CONCURRENCY caller threads each doing pool.apply(f, (item,)) ({item}), one call at a time per thread, timed per call"
            ),
            kind: Kind::Python {
                kind: "apply_threads",
                chunksize: None,
            },
        },
        Baseline {
            id: "executor_submit_threads",
            label: format!("Executor.submit from {} threads", w.concurrency),
            description: format!(
                "concurrent.futures.ProcessPoolExecutor(WORKERS), CONCURRENCY caller threads each doing executor.submit(f, item).result() ({item}), timed per call"
            ),
            kind: Kind::Python {
                kind: "submit_threads",
                chunksize: None,
            },
        },
    ]
}

/// The interpreter the pool's workers run (after resolving shims), for the baselines.
pub async fn interpreter(global: &Global) -> Result<PathBuf, Failure> {
    let mut spec = WorkerSpec::new("bench-baseline", "probe", "");
    spec.python = global.python.clone();
    let interpreter = ProcessLauncher::new()
        .interpreter(&spec)
        .await
        .map_err(|err| Failure::start(err.to_string()))?;
    Ok(interpreter.executable)
}

impl Baseline {
    /// One run of the workload.
    pub async fn run(
        &self,
        ui: &Ui,
        python: &Path,
        transport: &str,
        assets: &Assets,
        w: Workload,
    ) -> Result<Measurement, Failure> {
        match self.kind {
            Kind::RawFloor => raw_floor(ui, python, &assets.path(RAW_ECHO.0), transport, w).await,
            Kind::Python { kind, chunksize } => {
                let script = assets.path(PYTHON_POOLS.0);
                python_pool(ui, python, &script, kind, chunksize, &self.label, w).await
            }
        }
    }

    /// Its chunksize, for the map-like baselines.
    pub fn chunksize(&self) -> Option<u64> {
        match self.kind {
            Kind::Python { chunksize, .. } => chunksize,
            Kind::RawFloor => None,
        }
    }
}

/// One baseline's runs and how pypool compares to them.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    #[serde(skip)]
    pub id: &'static str,
    pub label: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunksize: Option<u64>,
    #[serde(flatten)]
    pub summary: Summary,
    /// Above 1: pypool is that many times faster; below 1: 1/that many times slower.
    pub pypool_speedup: Speedup,
}

impl Compared {
    pub fn new(baseline: &Baseline, runs: Vec<Measurement>, pypool: &[Measurement]) -> Self {
        Compared {
            id: baseline.id,
            label: baseline.label.clone(),
            description: baseline.description.clone(),
            chunksize: baseline.chunksize(),
            pypool_speedup: Speedup::between(pypool, &runs),
            summary: Summary::of(runs),
        }
    }
}

/// Every baseline, under the `baselines` key of `pypool bench --baseline --json`: an object
/// from each baseline's id to its figures, in the order of the tables.
#[derive(Debug, Clone)]
pub struct Baselines(pub Vec<Compared>);

impl Serialize for Baselines {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for compared in &self.0 {
            map.serialize_entry(compared.id, compared)?;
        }
        map.end()
    }
}

/// One echo process, driven pipelined: callers queue requests with the writer, which sends
/// every queued frame with one write and hands the callers' reply slots, in order, to the
/// reader, which completes them as the echoes come back.
struct Echo {
    requests: mpsc::UnboundedSender<oneshot::Sender<Result<usize, String>>>,
}

impl Echo {
    fn new(
        writer: Box<dyn AsyncWrite + Unpin + Send>,
        reader: Box<dyn AsyncRead + Unpin + Send>,
        frame: Arc<[u8]>,
        tasks: &mut JoinSet<()>,
    ) -> Echo {
        let (requests, mut queued) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<usize, String>>>();
        let (in_flight, mut waiting) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<usize, String>>>();
        tasks.spawn(async move {
            let mut writer = writer;
            let mut batch = Vec::new();
            while let Some(first) = queued.recv().await {
                batch.clear();
                batch.extend_from_slice(&frame);
                let _ = in_flight.send(first);
                while let Ok(next) = queued.try_recv() {
                    batch.extend_from_slice(&frame);
                    let _ = in_flight.send(next);
                }
                if writer.write_all(&batch).await.is_err() {
                    break;
                }
            }
            // Dropping the writer closes the channel: the echo process exits at end of file.
        });
        tasks.spawn(async move {
            let mut reader = BufReader::with_capacity(64 * 1024, reader);
            let mut body = Vec::new();
            loop {
                let mut head = [0u8; 4];
                let echoed = async {
                    reader.read_exact(&mut head).await?;
                    body.resize(u32::from_be_bytes(head) as usize, 0);
                    reader.read_exact(&mut body).await?;
                    Ok::<usize, std::io::Error>(body.len())
                }
                .await;
                match echoed {
                    Ok(len) => match waiting.recv().await {
                        Some(reply) => {
                            let _ = reply.send(Ok(len));
                        }
                        None => return,
                    },
                    Err(err) => {
                        waiting.close();
                        while let Some(reply) = waiting.recv().await {
                            let _ = reply.send(Err(format!("the echo process failed: {err}")));
                        }
                        return;
                    }
                }
            }
        });
        Echo { requests }
    }

    /// Sends one frame and waits for its echo; returns the echoed body's length.
    async fn round_trip(&self) -> Result<usize, String> {
        let (reply, echoed) = oneshot::channel();
        self.requests
            .send(reply)
            .map_err(|_| "the echo process was closed".to_owned())?;
        echoed
            .await
            .map_err(|_| "the echo process went away".to_owned())?
    }
}

/// The physical floor: `workers` Python processes echoing frames over the transport's kind of
/// channel (their pipes for stdio, a Unix socket each for ipc), driven straight from Rust: no
/// protocol, no pool. Callers are spread over the processes; each process has as many frames in
/// flight as its callers send.
async fn raw_floor(
    ui: &Ui,
    python: &Path,
    script: &Path,
    transport: &str,
    w: Workload,
) -> Result<Measurement, Failure> {
    let spinner = ui.spinner(format!("raw floor: starting {} echo processes", w.workers));
    // With payload 0 (the no-op) the frame carries 8 bytes: the small int, without a protocol.
    let body = if w.payload == 0 { 8 } else { w.payload };
    let len = u32::try_from(body)
        .map_err(|_| Failure::usage("the payload is too large for one frame"))?;
    let mut frame = Vec::with_capacity(4 + body);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.resize(4 + body, b'x');
    let frame: Arc<[u8]> = frame.into();

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
    let mut tasks = JoinSet::new();
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
        echoes.push(Echo::new(writer, reader, frame.clone(), &mut tasks));
        children.push(child);
    }
    // Ready = every process has echoed one frame.
    for echo in &echoes {
        echo.round_trip()
            .await
            .map_err(|err| Failure::start(format!("raw floor baseline: {err}")))?;
    }
    let startup = t0.elapsed();
    spinner.finish_and_clear();

    let expected = body;
    let bar = ui.bar(w.calls, "raw floor");
    let echoes = Arc::new(echoes);
    let caller_echoes = echoes.clone();
    let workers = w.workers;
    let driven = drive(w.concurrency, w.calls, &bar, move |caller, _| {
        let echoes = caller_echoes.clone();
        async move {
            match echoes[caller % workers].round_trip().await {
                Ok(n) if n == expected => Ok(()),
                Ok(n) => Err(format!("echoed {n} bytes instead of {expected}")),
                Err(err) => Err(err),
            }
        }
    })
    .await;
    bar.finish_and_clear();

    // Close every channel: the writers end, and the scripts exit at end of file.
    drop(echoes);
    while tasks.join_next().await.is_some() {}
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
    chunksize: Option<u64>,
    label: &str,
    w: Workload,
) -> Result<Measurement, Failure> {
    let spinner = ui.spinner(format!("{label}: {} workers, {} calls", w.workers, w.calls));
    let mut command = Command::new(python);
    command
        .arg(script)
        .args(["--kind", kind])
        .args(["--workers", &w.workers.to_string()])
        .args(["--concurrency", &w.concurrency.to_string()])
        .args(["--calls", &w.calls.to_string()])
        .args(["--payload", &w.payload.to_string()]);
    if let Some(chunksize) = chunksize {
        command.args(["--chunksize", &chunksize.to_string()]);
    }
    let output = command
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_automatic_chunksize_is_pool_maps() {
        // CPython: chunksize, extra = divmod(len(iterable), len(self._pool) * 4); if extra: += 1
        assert_eq!(auto_chunksize(100_000, 2), 12_500);
        assert_eq!(auto_chunksize(100_001, 2), 12_501);
        assert_eq!(auto_chunksize(3, 2), 1);
        assert_eq!(auto_chunksize(0, 2), 1);
    }
}
