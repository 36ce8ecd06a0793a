//! [`StdioLauncher`]: starts `python -m pypool_worker --transport stdio` and frames its pipes.

use async_trait::async_trait;
use pool_core::protocol::channel_from_io;
use pool_core::{Channel, LaunchError, Launched, Launcher, WorkerSpec};
use pool_process::{ProcessLauncher, SpawnOptions, WorkerProcess};

/// Launches Python workers that speak protocol v1 over their stdin (pool → worker) and stdout
/// (worker → pool).
///
/// Each launch runs `<python> -m pypool_worker --app <app> --transport stdio` through a
/// [`ProcessLauncher`], which owns the worker's whole process tree, arms the parent-death
/// signal, resolves the interpreter once and provides the embedded runtime. The worker's stderr
/// becomes `tracing` events (target `pypool::worker`) plus a bounded tail. The launcher returns
/// as soon as the process runs: the HELLO/WELCOME handshake is the pool's job.
///
/// The Python runtime keeps the real stdout for frames and points file descriptor 1 and
/// `sys.stdout` at stderr, so a stray `print()` cannot corrupt the stream.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), pool_core::LaunchError> {
/// use pool_core::{Launcher, WorkerSpec};
/// use transport_stdio::StdioLauncher;
///
/// let launcher = StdioLauncher::new();
/// let spec = WorkerSpec::new("demo", "w1", "my_app.py");
/// let launched = launcher.launch(&spec).await?;
/// // `launched.channel` carries frames; the pool now reads HELLO and sends WELCOME.
/// # drop(launched);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct StdioLauncher {
    processes: ProcessLauncher,
}

impl StdioLauncher {
    /// A launcher with default settings.
    pub fn new() -> Self {
        StdioLauncher::default()
    }

    /// Starts workers with this process launcher (its interpreter cache and stderr settings)
    /// instead of a default one.
    pub fn with_processes(processes: ProcessLauncher) -> Self {
        StdioLauncher { processes }
    }

    /// The process launcher behind this transport (for its interpreter resolution, say).
    pub fn processes(&self) -> &ProcessLauncher {
        &self.processes
    }

    /// Like [`Launcher::launch`], but returns the concrete [`WorkerProcess`] (for callers that
    /// want [`WorkerProcess::exited`] or do not need a trait object).
    pub async fn launch_process(
        &self,
        spec: &WorkerSpec,
    ) -> Result<(Channel, WorkerProcess), LaunchError> {
        let worker = self
            .processes
            .spawn(spec, &SpawnOptions::new("stdio").frame_pipes(true))
            .await?;
        let (Some(stdin), Some(stdout)) = (worker.stdin, worker.stdout) else {
            // Cannot happen (both are piped); dropping the process kills the worker.
            return Err(LaunchError::new(
                "the worker's stdin/stdout pipes are missing",
            ));
        };
        let channel = channel_from_io(stdout, stdin, spec.max_frame);
        Ok((channel, worker.process))
    }
}

#[async_trait]
impl Launcher for StdioLauncher {
    fn name(&self) -> &str {
        "stdio"
    }

    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        let (channel, process) = self.launch_process(spec).await?;
        Ok(Launched {
            channel,
            process: Some(Box::new(process)),
        })
    }
}
