//! [`ProcessLauncher`]: starts `python -m pypool_worker` for a [`WorkerSpec`], the same way for
//! every transport that spawns local workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pool_core::{LaunchError, WorkerSpec};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::OnceCell;

use crate::interpreter::{self, Interpreter};
use crate::process::{Labels, WorkerProcess};
use crate::runtime;
use crate::spawner;

/// Thread-pool sizes of the numeric libraries, pinned to 1 unless the spec or the pool's own
/// environment says otherwise, so that hundreds of workers do not each start a thread per core.
pub const THREAD_LIMIT_VARS: &[&str] = &[
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
];

/// How long [`wait`](pool_core::ProcessHandle::wait) waits, after the worker exited and its
/// process group was killed, for its stderr to reach end-of-file. Only a descendant that left the
/// group (`setsid`) can hold stderr open that long.
pub const DEFAULT_STDERR_DRAIN: Duration = Duration::from_millis(100);

/// What the interpreter probe depends on: the interpreter, and the environment and working
/// directory that decide whether `pypool_worker` is importable.
type ProbeKey = (PathBuf, Option<PathBuf>, BTreeMap<String, String>);

/// Starts local Python workers: the process half of every spawning transport.
///
/// [`spawn`](Self::spawn) runs `<python> -m pypool_worker --app <app> --transport <t>`, where
/// `<python>` is the real binary behind [`WorkerSpec::python`] (shims are resolved once per
/// interpreter and cached here). Every worker:
///
/// * leads its own process group, and the returned [`WorkerProcess`] owns that whole group: when
///   the worker exits by any path, everything left in its group is killed before the worker is
///   reaped (see [`WorkerProcess`]);
/// * on Linux gets `SIGHUP` from the kernel when the pool's process dies (`PR_SET_PDEATHSIG`,
///   armed from a long-lived spawner thread); the runtime answers it by killing its group;
/// * gets thread-pool limits for numeric libraries ([`THREAD_LIMIT_VARS`]), `PYTHONUNBUFFERED=1`,
///   `PYPOOL_WORKER_ID`, and, with [`SpawnOptions::secret`], a secret on an inherited pipe rather
///   than in its environment;
/// * has its stderr turned into `tracing` events (target `pypool::worker`) and a bounded tail.
///
/// If the interpreter cannot import a `pypool_worker` of the embedded version, the embedded
/// runtime is written to a private cache directory (see [`crate::runtime`]) and put first on
/// `PYTHONPATH`, so a bare `python3` works.
pub struct ProcessLauncher {
    interpreters: Mutex<HashMap<ProbeKey, Arc<OnceCell<Interpreter>>>>,
    runtime_dir: OnceCell<PathBuf>,
    /// Interpreters that have byte-compiled the materialised runtime (see [`Self::precompile`]).
    precompiled: tokio::sync::Mutex<HashSet<PathBuf>>,
    stderr_drain: Duration,
}

impl std::fmt::Debug for ProcessLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessLauncher")
            .field("runtime_dir", &self.runtime_dir.get())
            .field("stderr_drain", &self.stderr_drain)
            .finish_non_exhaustive()
    }
}

impl Default for ProcessLauncher {
    fn default() -> Self {
        ProcessLauncher::new()
    }
}

impl ProcessLauncher {
    /// A launcher with default settings.
    pub fn new() -> Self {
        ProcessLauncher {
            interpreters: Mutex::new(HashMap::new()),
            runtime_dir: OnceCell::new(),
            precompiled: tokio::sync::Mutex::new(HashSet::new()),
            stderr_drain: DEFAULT_STDERR_DRAIN,
        }
    }

    /// Sets how long `wait` waits for stderr to close after the worker exited
    /// (default [`DEFAULT_STDERR_DRAIN`]).
    pub fn with_stderr_drain(mut self, drain: Duration) -> Self {
        self.stderr_drain = drain;
        self
    }

    /// The interpreter `spec` runs, resolved through `sys.executable`.
    ///
    /// The first call for a given interpreter (with a given environment and working directory)
    /// runs it once; later calls, including concurrent ones, share that answer. A failure is not
    /// cached, so a later launch tries again.
    pub async fn interpreter(&self, spec: &WorkerSpec) -> Result<Interpreter, LaunchError> {
        let key: ProbeKey = (spec.python.clone(), spec.cwd.clone(), spec.env.clone());
        let cell = Arc::clone(self.interpreters.lock().entry(key).or_default());
        let interpreter = cell
            .get_or_try_init(|| interpreter::probe(&spec.python, &spec.env, spec.cwd.as_deref()))
            .await?;
        Ok(interpreter.clone())
    }

    /// The directory holding the materialised embedded runtime. Written once per launcher; a
    /// later launch only checks that it is still there (a temp-dir cleaner may have removed it)
    /// and writes it again if not.
    async fn runtime_dir(&self) -> Result<PathBuf, LaunchError> {
        let dir = self.runtime_dir.get_or_try_init(materialize).await?;
        let marker = dir.join(runtime::PACKAGE).join("__main__.py");
        // One stat call: cheap enough not to need a blocking thread.
        if marker.is_file() {
            Ok(dir.clone())
        } else {
            materialize().await
        }
    }

    /// Byte-compiles the materialised runtime once per interpreter, so that workers do not each
    /// compile it from source at start-up (they would, where `PYTHONDONTWRITEBYTECODE` is set or
    /// the cache directory is read-only to them): several milliseconds per worker. Failure only
    /// costs that time, so it is logged and ignored.
    async fn precompile(&self, interpreter: &Interpreter, dir: &Path) {
        let mut done = self.precompiled.lock().await;
        if done.contains(&interpreter.executable) {
            return;
        }
        let status = Command::new(&interpreter.executable)
            .args(["-m", "compileall", "-q"])
            .arg(dir.join(runtime::PACKAGE))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await;
        match status {
            Ok(status) if status.success() => {}
            other => tracing::debug!(?other, "could not byte-compile the pypool_worker runtime"),
        }
        done.insert(interpreter.executable.clone());
    }

    fn command(
        &self,
        spec: &WorkerSpec,
        options: &SpawnOptions,
        interpreter: &Interpreter,
        runtime_dir: Option<PathBuf>,
    ) -> Result<Command, LaunchError> {
        let mut command = Command::new(&interpreter.executable);
        command
            .arg("-m")
            .arg(runtime::PACKAGE)
            .arg("--app")
            .arg(&spec.app)
            .arg("--transport")
            .arg(&options.transport);
        for var in THREAD_LIMIT_VARS {
            if !spec.env.contains_key(*var) && std::env::var_os(var).is_none() {
                command.env(var, "1");
            }
        }
        command.env("PYTHONUNBUFFERED", "1");
        command.envs(&spec.env);
        command.env("PYPOOL_WORKER_ID", &spec.worker_id);
        // The transport's own variables win over the spec's.
        command.envs(options.env.iter().map(|(key, value)| (key, value)));
        if let Some(dir) = runtime_dir {
            let existing: Option<OsString> = match spec.env.get("PYTHONPATH") {
                Some(value) => Some(value.into()),
                None => std::env::var_os("PYTHONPATH"),
            };
            let mut paths = vec![dir];
            if let Some(existing) = existing.filter(|value| !value.is_empty()) {
                paths.extend(std::env::split_paths(&existing));
            }
            let joined = std::env::join_paths(paths).map_err(|err| {
                LaunchError::new(format!("cannot build PYTHONPATH for the worker: {err}"))
            })?;
            command.env("PYTHONPATH", joined);
        }
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let frames = || {
            if options.frame_pipes {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        command
            .stdin(frames())
            .stdout(frames())
            .stderr(Stdio::piped())
            // If nobody reaps the child through us (a runtime shut down mid-launch), tokio kills
            // it and reaps it in the background.
            .kill_on_drop(true);
        Ok(command)
    }

    /// Starts `python -m pypool_worker --app <app> --transport <options.transport>` for `spec`
    /// and returns its [`WorkerProcess`] (and its stdin/stdout with
    /// [`SpawnOptions::frame_pipes`]).
    ///
    /// The variables in [`SpawnOptions::env`] are set last, over the spec's; they are passed in
    /// the environment, never on the command line.
    pub async fn spawn(
        &self,
        spec: &WorkerSpec,
        options: &SpawnOptions,
    ) -> Result<SpawnedWorker, LaunchError> {
        let interpreter = self.interpreter(spec).await?;
        let runtime_dir = if interpreter.has_matching_runtime() {
            None
        } else {
            let dir = self.runtime_dir().await?;
            self.precompile(&interpreter, &dir).await;
            Some(dir)
        };
        let command = self.command(spec, options, &interpreter, runtime_dir)?;
        let mut child = spawner::spawn(command).await.map_err(|err| {
            LaunchError::new(format!(
                "cannot start worker {} of pool {}: `{}`: {err}",
                spec.worker_id,
                spec.pool,
                interpreter.executable.display()
            ))
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let labels = Labels {
            pool: spec.pool.clone(),
            worker_id: spec.worker_id.clone(),
        };
        let process = WorkerProcess::start(
            child,
            stderr,
            spec.stderr_tail_lines,
            labels,
            self.stderr_drain,
        )?;
        tracing::debug!(
            target: "pypool::process",
            pool = %spec.pool,
            worker_id = %spec.worker_id,
            pid = ?pool_core::ProcessHandle::pid(&process),
            python = %interpreter.executable.display(),
            transport = %options.transport,
            "worker process started"
        );
        Ok(SpawnedWorker {
            process,
            stdin,
            stdout,
        })
    }
}

async fn materialize() -> Result<PathBuf, LaunchError> {
    match tokio::task::spawn_blocking(runtime::materialize_runtime).await {
        Ok(Ok(dir)) => Ok(dir),
        Ok(Err(err)) => Err(LaunchError::new(err.to_string())),
        Err(err) => Err(LaunchError::new(format!(
            "materialising the pypool_worker runtime failed: {err}"
        ))),
    }
}

/// How [`ProcessLauncher::spawn`] starts a worker: which transport the runtime speaks, extra
/// environment for it, and whether its stdin/stdout carry frames.
///
/// `Debug` shows the names of the extra variables but not their values.
///
/// # Example
///
/// ```
/// use pool_process::SpawnOptions;
///
/// let options = SpawnOptions::new("ipc").env("PYPOOL_IPC_PATH", "/run/user/1000/pypool/pool.sock");
/// assert_eq!(options.transport(), "ipc");
/// ```
#[derive(Clone)]
pub struct SpawnOptions {
    transport: String,
    env: Vec<(String, String)>,
    frame_pipes: bool,
}

impl SpawnOptions {
    /// Options for a worker started with `--transport <transport>`, no extra environment, and
    /// stdin/stdout connected to `/dev/null` (see [`frame_pipes`](Self::frame_pipes)).
    pub fn new(transport: impl Into<String>) -> Self {
        SpawnOptions {
            transport: transport.into(),
            env: Vec::new(),
            frame_pipes: false,
        }
    }

    /// Sets an environment variable for the worker, over any value the spec or the pool's own
    /// environment gives it.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Whether the worker's stdin and stdout are pipes returned in [`SpawnedWorker`] (the stdio
    /// transport's frame channel) or `/dev/null` (transports with their own channel). Default:
    /// `false`.
    pub fn frame_pipes(mut self, frame_pipes: bool) -> Self {
        self.frame_pipes = frame_pipes;
        self
    }

    /// The `--transport` value the worker is started with.
    pub fn transport(&self) -> &str {
        &self.transport
    }
}

impl std::fmt::Debug for SpawnOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(key, _)| key.as_str()).collect();
        f.debug_struct("SpawnOptions")
            .field("transport", &self.transport)
            .field("env", &names)
            .field("frame_pipes", &self.frame_pipes)
            .finish()
    }
}

/// A worker process started by [`ProcessLauncher::spawn`].
#[derive(Debug)]
pub struct SpawnedWorker {
    /// The process handle. Dropping it kills the worker's process group.
    pub process: WorkerProcess,
    /// The worker's stdin, when [`SpawnOptions::frame_pipes`] was set.
    pub stdin: Option<ChildStdin>,
    /// The worker's stdout, when [`SpawnOptions::frame_pipes`] was set.
    pub stdout: Option<ChildStdout>,
}
