//! The seam between the pool and a transport: launching a worker and moving whole frames.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::protocol::DEFAULT_MAX_FRAME;

/// Everything a transport needs to start one worker.
///
/// The pool fills this from its [`PoolConfig`](crate::PoolConfig) for every launch; a launcher
/// turns it into a process (or a connection to a remote worker).
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The pool's name, for logs and error messages.
    pub pool: String,
    /// The id the pool gives this worker (unique within the pool); passed to the worker as
    /// `PYPOOL_WORKER_ID`.
    pub worker_id: String,
    /// The application the worker serves: a dotted module name or a path to a `.py` file.
    pub app: String,
    /// The Python interpreter to run (a name looked up in `PATH`, or a path). Launchers resolve
    /// shims such as pyenv's once, via `sys.executable`.
    pub python: PathBuf,
    /// Extra environment variables for the worker.
    pub env: BTreeMap<String, String>,
    /// Working directory for the worker; `None` inherits the pool's.
    pub cwd: Option<PathBuf>,
    /// The largest frame either side may send.
    pub max_frame: usize,
    /// How many lines of stderr to keep for error messages.
    pub stderr_tail_lines: usize,
}

impl WorkerSpec {
    /// A spec for `app` with defaults for everything else (`python3`, 256 MiB frames).
    pub fn new(
        pool: impl Into<String>,
        worker_id: impl Into<String>,
        app: impl Into<String>,
    ) -> Self {
        WorkerSpec {
            pool: pool.into(),
            worker_id: worker_id.into(),
            app: app.into(),
            python: PathBuf::from("python3"),
            env: BTreeMap::new(),
            cwd: None,
            max_frame: DEFAULT_MAX_FRAME,
            stderr_tail_lines: 40,
        }
    }
}

/// Sends whole frame bodies to the peer. Implementations add the transport's framing.
#[async_trait]
pub trait FrameSender: Send + Sync {
    /// Sends one frame body. An error means the channel is unusable from now on.
    async fn send(&mut self, body: Bytes) -> io::Result<()>;
    /// Sends several frame bodies in order, as few system calls as the transport allows (the
    /// pool's writer hands over everything queued at once). The default sends them one by one.
    async fn send_many(&mut self, bodies: &mut Vec<Bytes>) -> io::Result<()> {
        for body in bodies.drain(..) {
            self.send(body).await?;
        }
        Ok(())
    }
    /// Closes the sending direction (the peer sees end-of-file). Errors are ignored by the pool.
    async fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receives whole frame bodies from the peer.
#[async_trait]
pub trait FrameReceiver: Send {
    /// The next frame body; `Ok(None)` at a clean end of stream. A frame larger than the
    /// channel's maximum is an error ([`io::ErrorKind::InvalidData`]) raised before allocating it.
    async fn recv(&mut self) -> io::Result<Option<Bytes>>;
}

/// A framed duplex connection to one worker, split so that one task can read while others send.
pub struct Channel {
    /// The sending half.
    pub sender: Box<dyn FrameSender>,
    /// The receiving half.
    pub receiver: Box<dyn FrameReceiver>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Channel { .. }")
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ExitInfo {
    /// The exit status, when the process exited normally.
    pub code: Option<i32>,
    /// The signal that ended the process, on Unix.
    pub signal: Option<i32>,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "signal {signal}"),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Control over a launched worker process. Remote workers have none.
///
/// Implementations must make [`kill`](ProcessHandle::kill) safe to call from `Drop` (no async,
/// no runtime needed), because a dropped pool kills its workers synchronously, and must kill the
/// process when the handle itself is dropped while it still runs.
#[async_trait]
pub trait ProcessHandle: Send + Sync {
    /// The operating-system process id.
    fn pid(&self) -> Option<u32>;
    /// Asks the process (group) to terminate (SIGTERM on Unix). Idempotent.
    fn terminate(&self);
    /// Kills the process (group) at once (SIGKILL on Unix). Idempotent, synchronous.
    fn kill(&self);
    /// Waits for the process to exit and reaps it. Cancel-safe; may be called more than once.
    async fn wait(&self) -> ExitInfo;
    /// The exit status if the process has already exited.
    fn try_exit(&self) -> Option<ExitInfo>;
    /// Resident memory in bytes, when the platform reports it.
    fn rss_bytes(&self) -> Option<u64> {
        None
    }
    /// The last lines the process wrote to stderr, oldest first.
    fn stderr_tail(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a successful launch returns.
pub struct Launched {
    /// The framed connection to the worker.
    pub channel: Channel,
    /// The process, if the pool started one. Dropping it kills the process.
    pub process: Option<Box<dyn ProcessHandle>>,
}

impl fmt::Debug for Launched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launched")
            .field("pid", &self.process.as_ref().and_then(|p| p.pid()))
            .finish()
    }
}

/// Starts workers. Each transport crate implements this; the pool holds an `Arc<dyn Launcher>`.
///
/// A launcher only moves frames and manages processes: handshakes, deadlines, health and
/// recycling are the pool's job.
///
/// # Example
///
/// ```
/// use async_trait::async_trait;
/// use pool_core::{Launched, Launcher, LaunchError, WorkerSpec};
///
/// struct NeverStarts;
///
/// #[async_trait]
/// impl Launcher for NeverStarts {
///     fn name(&self) -> &str { "never" }
///     async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
///         Err(LaunchError::new(format!("cannot start {}", spec.worker_id)))
///     }
/// }
/// ```
#[async_trait]
pub trait Launcher: Send + Sync + 'static {
    /// The transport's name (`"stdio"`, `"ipc"`, `"zmq"`, `"fake"`), for logs and status.
    fn name(&self) -> &str;
    /// Starts one worker and returns its channel. Transports that authenticate (ipc, zmq) finish
    /// the AUTH exchange (see [`crate::protocol::auth`]) before returning; the HELLO/WELCOME
    /// handshake is the pool's job.
    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError>;
    /// Releases transport resources (listening sockets, socket files) once the pool is done.
    async fn shutdown(&self) {}
    /// How long the handshake may take after launch, if the transport wants more than the pool's
    /// default (remote workers, for instance).
    fn handshake_timeout(&self) -> Option<Duration> {
        None
    }
    /// How long one [`launch`](Launcher::launch) may take before the pool abandons it and counts
    /// a failed launch, if the transport wants something other than the pool's setting.
    /// Launchers whose launch waits for a remote worker to join return `Some(Duration::MAX)`:
    /// waiting for a peer is not a failure.
    fn launch_timeout(&self) -> Option<Duration> {
        None
    }
}

/// A failed launch: what went wrong, with the worker's stderr tail when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError {
    /// What failed.
    pub message: String,
    /// The last lines of the worker's stderr, if it got far enough to write any.
    pub stderr_tail: Vec<String>,
}

impl LaunchError {
    /// A launch error with a message and no stderr.
    pub fn new(message: impl Into<String>) -> Self {
        LaunchError {
            message: message.into(),
            stderr_tail: Vec::new(),
        }
    }

    /// Adds the stderr tail.
    pub fn with_stderr(mut self, stderr_tail: Vec<String>) -> Self {
        self.stderr_tail = stderr_tail;
        self
    }
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        write_stderr_tail(f, &self.stderr_tail)
    }
}

impl std::error::Error for LaunchError {}

impl From<io::Error> for LaunchError {
    fn from(err: io::Error) -> Self {
        LaunchError::new(err.to_string())
    }
}

pub(crate) fn write_stderr_tail(f: &mut fmt::Formatter<'_>, tail: &[String]) -> fmt::Result {
    if tail.is_empty() {
        return Ok(());
    }
    f.write_str("\n--- worker stderr (last lines) ---")?;
    for line in tail {
        write!(f, "\n{line}")?;
    }
    Ok(())
}
