//! [`IpcLauncher`]: workers started like the stdio transport's, connected over a local socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pool_core::{LaunchError, Launched, Launcher, WorkerSpec};

use crate::endpoint::{BindOptions, Endpoint};

/// How long a connection has to answer the CHALLENGE with a correct AUTH, by default.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a launch waits, by default, for its worker to connect and authenticate.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable that gives a worker the socket to connect to.
pub const ENV_IPC_PATH: &str = "PYPOOL_IPC_PATH";

/// Launches Python workers that connect back to the pool over a local socket (a Unix domain
/// socket; a named pipe on Windows) and authenticate before their handshake.
///
/// * **One socket per launcher.** On first use (or [`listen`](Self::listen)) the launcher creates
///   a private directory (mode 0700, named after the pool's pid and 64 random bits) under
///   `$XDG_RUNTIME_DIR`, else the temporary directory, and listens on `pool.sock` in it (mode
///   0600). Nothing is shared with other launchers, pools or processes, so they never collide,
///   and a stale socket left by a crashed run is never in the way.
///   [`shutdown`](Launcher::shutdown) and `Drop` close the socket and remove the file and the
///   directory. A launch after `shutdown` listens again, on a fresh socket. Give each pool its
///   own launcher: a pool's shutdown closes the socket for everyone using the launcher
///   (connected workers are not affected, launches in progress fail).
/// * **Processes** are started by a [`pool_process::ProcessLauncher`], as every spawning
///   transport starts them (resolved interpreter, embedded runtime, the worker's whole process
///   tree owned, parent-death signal, stderr tail, reaping), with `--transport ipc`. The socket
///   path goes in the worker's environment ([`ENV_IPC_PATH`]); the per-socket secret on an
///   inherited pipe ([`pool_process::SpawnOptions::secret`]), never in its environment or argv.
///   Its stdin and stdout are `/dev/null`.
/// * **Authentication first.** Every connection runs
///   [`challenge`](pool_core::protocol::auth::challenge) in its own task: it must answer with
///   the right HMAC within the [auth timeout](Self::auth_timeout) and send nothing else first.
///   On Unix the peer must also run as our user (`SO_PEERCRED`). A connection that fails is
///   closed and logged (`tracing` warning, target `pypool::ipc`) and never becomes a worker; it
///   does not hold up anyone else's connection.
/// * **Pairing by pid.** An authenticated connection is handed to the launch that started the
///   process the kernel says made it; a connection from any other process is closed.
/// * A launch waits up to the [connect timeout](Self::connect_timeout) for its worker's
///   connection. If the worker exits first, or the timeout passes, the launch fails with the
///   worker's stderr tail (and a worker that timed out is killed).
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> pool_core::Result<()> {
/// use std::sync::Arc;
/// use pool_core::{Pool, PoolConfig};
/// use transport_ipc::IpcLauncher;
///
/// let pool = Pool::start(PoolConfig::new("handlers.py").size(4), Arc::new(IpcLauncher::new()))
///     .await?;
/// let reply = pool.call("predict", serde_json::json!({"x": [1, 2, 3]})).await?;
/// # drop(reply);
/// pool.shutdown(std::time::Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
pub struct IpcLauncher {
    #[cfg(unix)]
    processes: pool_process::ProcessLauncher,
    auth_timeout: Duration,
    connect_timeout: Duration,
    socket_dir: Option<PathBuf>,
    endpoint: Mutex<Option<Arc<Endpoint>>>,
}

impl std::fmt::Debug for IpcLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcLauncher")
            .field("socket", &self.socket_path())
            .field("auth_timeout", &self.auth_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for IpcLauncher {
    fn default() -> Self {
        IpcLauncher::new()
    }
}

impl IpcLauncher {
    /// A launcher with default settings. It does not listen until its first launch (or
    /// [`listen`](Self::listen)), so it can be created outside a tokio runtime.
    pub fn new() -> Self {
        IpcLauncher {
            #[cfg(unix)]
            processes: pool_process::ProcessLauncher::new(),
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            socket_dir: None,
            endpoint: Mutex::new(None),
        }
    }

    /// Sets how long a connection has to authenticate (default [`DEFAULT_AUTH_TIMEOUT`]).
    /// Applies to sockets bound after the call.
    pub fn auth_timeout(mut self, timeout: Duration) -> Self {
        self.auth_timeout = timeout;
        self
    }

    /// Sets how long a launch waits, once the worker process runs, for it to connect and
    /// authenticate (default [`DEFAULT_CONNECT_TIMEOUT`]). It covers the interpreter's start-up,
    /// but not the application's import, which comes after the connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Creates the private socket directory under `dir` (which must exist) instead of
    /// `$XDG_RUNTIME_DIR` or the temporary directory. A relative `dir` is taken relative to the
    /// current directory when the launcher starts listening. Unix only; ignored for Windows
    /// named pipes.
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.socket_dir = Some(dir.into());
        self
    }

    /// Starts workers with this process launcher (its interpreter cache and stderr settings)
    /// instead of a default one.
    #[cfg(unix)]
    pub fn process_launcher(mut self, launcher: pool_process::ProcessLauncher) -> Self {
        self.processes = launcher;
        self
    }

    /// Listens now, if not already listening, and returns the socket's path (the value workers
    /// get in [`ENV_IPC_PATH`]). The first launch does this by itself; calling it earlier moves
    /// the cost out of the first launch and tells where the socket is. Must be called within a
    /// tokio runtime: the accept loop runs on it.
    pub fn listen(&self) -> Result<PathBuf, LaunchError> {
        Ok(self.endpoint()?.address().to_path_buf())
    }

    /// The socket's path while the launcher listens; `None` before the first launch and after
    /// [`shutdown`](Launcher::shutdown). The socket is alone in its private directory, its
    /// parent.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.endpoint
            .lock()
            .as_ref()
            .filter(|endpoint| endpoint.is_usable())
            .map(|endpoint| endpoint.address().to_path_buf())
    }

    /// The current endpoint, binding a new one if there is none or the old one stopped (its
    /// runtime ended).
    fn endpoint(&self) -> Result<Arc<Endpoint>, LaunchError> {
        let mut slot = self.endpoint.lock();
        if let Some(endpoint) = slot.as_ref().filter(|endpoint| endpoint.is_usable()) {
            return Ok(Arc::clone(endpoint));
        }
        if let Some(old) = slot.take() {
            old.close();
        }
        let endpoint = Endpoint::bind(&BindOptions {
            socket_dir: self.socket_dir.as_deref(),
            auth_timeout: self.auth_timeout,
        })
        .map_err(|err| LaunchError::new(format!("ipc transport cannot listen: {err}")))?;
        *slot = Some(Arc::clone(&endpoint));
        Ok(endpoint)
    }
}

impl Drop for IpcLauncher {
    fn drop(&mut self) {
        if let Some(endpoint) = self.endpoint.lock().take() {
            endpoint.close();
        }
    }
}

#[async_trait]
impl Launcher for IpcLauncher {
    fn name(&self) -> &str {
        "ipc"
    }

    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        #[cfg(unix)]
        {
            let (channel, process) = self.launch_process(spec).await?;
            Ok(Launched {
                channel,
                process: Some(Box::new(process)),
            })
        }
        #[cfg(not(unix))]
        {
            // Listen anyway, so that the socket side can be exercised.
            self.endpoint()?;
            Err(LaunchError::new(format!(
                "cannot launch worker {} of pool {}: the ipc transport starts workers on Unix \
                 only (process control is shared with transport-stdio)",
                spec.worker_id, spec.pool
            )))
        }
    }

    async fn shutdown(&self) {
        let endpoint = self.endpoint.lock().take();
        if let Some(endpoint) = endpoint {
            endpoint.shut_down().await;
        }
    }
}

#[cfg(unix)]
impl IpcLauncher {
    /// Like [`Launcher::launch`], but returns the concrete
    /// [`WorkerProcess`](pool_process::WorkerProcess) (for callers that want
    /// [`exited`](pool_process::WorkerProcess::exited) or do not need a trait object). The
    /// channel is authenticated; the HELLO/WELCOME handshake is the caller's job.
    pub async fn launch_process(
        &self,
        spec: &WorkerSpec,
    ) -> Result<(pool_core::Channel, pool_process::WorkerProcess), LaunchError> {
        use pool_core::ProcessHandle;
        use pool_process::SpawnOptions;

        let endpoint = self.endpoint()?;
        let options = SpawnOptions::new("ipc")
            .env(ENV_IPC_PATH, endpoint.address().to_string_lossy())
            .secret(endpoint.secret_hex());
        // The pid is registered before the worker gets its secret, without which it cannot
        // connect: any connection from a pid not registered is a stranger's.
        let mut expected = None;
        let worker = self
            .processes
            .spawn_with(spec, &options, |pid| {
                expected = Some(endpoint.expect(pid, spec.max_frame));
            })
            .await?;
        let process = worker.process;
        let Some(mut expected) = expected else {
            return Err(fail(process, "the worker process has no pid".to_owned()).await);
        };
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let who = format!("worker {} of pool {}", spec.worker_id, spec.pool);
        let exited = process.exited();
        tokio::pin!(exited);
        let outcome = tokio::select! {
            biased;
            connection = expected.connection() => Some(connection),
            info = &mut exited => {
                if expected.connected() {
                    // It reached us before it exited: what it sent (a STARTUP_ERROR, say) is on
                    // its connection, which is being authenticated right now.
                    tokio::time::timeout_at(deadline, expected.connection()).await.ok()
                } else {
                    return Err(LaunchError::new(format!(
                        "{who} exited ({info}) before connecting to {}",
                        endpoint.address().display()
                    ))
                    .with_stderr(process.stderr_tail()));
                }
            }
            _ = tokio::time::sleep_until(deadline) => None,
        };
        match outcome {
            Some(Ok(channel)) => Ok((channel, process)),
            Some(Err(Some(reason))) => Err(fail(process, format!("{who}: {reason}")).await),
            Some(Err(None)) => Err(fail(
                process,
                format!("{who}: the ipc launcher shut down before the worker connected"),
            )
            .await),
            None => Err(fail(
                process,
                format!(
                    "{who} did not connect to {} within {:?}",
                    endpoint.address().display(),
                    self.connect_timeout
                ),
            )
            .await),
        }
    }
}

/// Kills a worker whose launch failed and returns the error with its last stderr lines.
#[cfg(unix)]
async fn fail(process: pool_process::WorkerProcess, message: String) -> LaunchError {
    use pool_core::ProcessHandle;
    process.kill();
    // The group is killed: the exit follows at once, and with it the complete stderr tail.
    let _ = process.wait().await;
    LaunchError::new(message).with_stderr(process.stderr_tail())
}
