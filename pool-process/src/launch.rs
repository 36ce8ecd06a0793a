//! [`ProcessLauncher`]: starts `python -m pypool_worker` for a [`WorkerSpec`], the same way for
//! every transport that spawns local workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    /// Boxed: launchers are embedded in transports' launchers, which callers keep in enums.
    settings: Box<Settings>,
}

/// A [`ProcessLauncher`]'s settings.
#[derive(Debug, Clone)]
struct Settings {
    stderr_drain: Duration,
    wrapper: Vec<String>,
}

impl std::fmt::Debug for ProcessLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessLauncher")
            .field("runtime_dir", &self.runtime_dir.get())
            .field("stderr_drain", &self.settings.stderr_drain)
            .field("wrapper", &self.settings.wrapper)
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
            settings: Box::new(Settings {
                stderr_drain: DEFAULT_STDERR_DRAIN,
                wrapper: Vec::new(),
            }),
        }
    }

    /// Runs the interpreter under a command: every worker (and the one-off interpreter probe) is
    /// started as `<wrapper...> <python> -m pypool_worker ...`. For `uv run` (the project's
    /// environment: `["uv", "run", "--"]`), `nice`/`taskset`/`chrt`, `env VAR=...`, or a
    /// container's entry point.
    ///
    /// The wrapper must pass the environment and standard streams through and stay in the
    /// worker's process group (the pool owns and ends that group). With a wrapper that gives the
    /// interpreter another file system (a container), install the runtime there
    /// (`pip install ./python`): the embedded copy is written on this machine. The ipc transport
    /// pairs a connection with its launch by process id, so under it the wrapper must `exec` the
    /// interpreter (`env`, `nice`, `taskset` do; `uv run` does not: use it with stdio).
    ///
    /// ```
    /// use pool_process::ProcessLauncher;
    ///
    /// let processes = ProcessLauncher::new().wrapper(["uv", "run", "--"]);
    /// assert_eq!(processes.wrapper_command(), ["uv", "run", "--"]);
    /// ```
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.settings.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// The command the interpreter runs under ([`wrapper`](Self::wrapper)); empty for none.
    pub fn wrapper_command(&self) -> &[String] {
        &self.settings.wrapper
    }

    /// Sets how long `wait` waits for stderr to close after the worker exited
    /// (default [`DEFAULT_STDERR_DRAIN`]).
    pub fn with_stderr_drain(mut self, drain: Duration) -> Self {
        self.settings.stderr_drain = drain;
        self
    }

    /// The interpreter `spec` runs: chosen by [`choose_python`](crate::choose_python) (the
    /// default `python3` honours `$PYPOOL_PYTHON` and an active `$VIRTUAL_ENV`), resolved
    /// through `sys.executable`.
    ///
    /// The first call for a given interpreter (with a given environment and working directory)
    /// runs it once; later calls, including concurrent ones, share that answer. A failure is not
    /// cached, so a later launch tries again.
    pub async fn interpreter(&self, spec: &WorkerSpec) -> Result<Interpreter, LaunchError> {
        let key: ProbeKey = (spec.python.clone(), spec.cwd.clone(), spec.env.clone());
        let cell = Arc::clone(self.interpreters.lock().entry(key).or_default());
        let interpreter = cell
            .get_or_try_init(|| {
                interpreter::probe(
                    &spec.python,
                    &self.settings.wrapper,
                    &spec.env,
                    spec.cwd.as_deref(),
                )
            })
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
        let status = interpreter::command_for(&self.settings.wrapper, &interpreter.executable)
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
        secret: Option<&OwnedFd>,
    ) -> Result<Command, LaunchError> {
        let mut command = interpreter::command_for(&self.settings.wrapper, &interpreter.executable);
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
        if let Some(secret) = secret {
            hand_over(&mut command, secret);
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
        self.spawn_with(spec, options, |_| {}).await
    }

    /// [`spawn`](Self::spawn), calling `on_spawned` with the new worker's pid as soon as the
    /// process exists and **before** it is handed its [secret](SpawnOptions::secret).
    ///
    /// The runtime reads its secret before it does anything else with it, so a transport that
    /// pairs connections with launches by the peer's pid can register the pid here and know that
    /// no connection from this worker can arrive before it: any unregistered peer is a stranger.
    pub async fn spawn_with(
        &self,
        spec: &WorkerSpec,
        options: &SpawnOptions,
        on_spawned: impl FnOnce(u32) + Send,
    ) -> Result<SpawnedWorker, LaunchError> {
        let interpreter = self.interpreter(spec).await?;
        let runtime_dir = if interpreter.has_matching_runtime() {
            None
        } else {
            let dir = self.runtime_dir().await?;
            self.precompile(&interpreter, &dir).await;
            Some(dir)
        };
        let secret = match &options.secret {
            Some(secret) => Some(SecretPipe::new(secret.as_bytes()).map_err(|err| {
                LaunchError::new(format!(
                    "cannot make the pipe for the worker's secret: {err}"
                ))
            })?),
            None => None,
        };
        let command = self.command(
            spec,
            options,
            &interpreter,
            runtime_dir,
            secret.as_ref().map(|pipe| &pipe.read),
        )?;
        let mut child = spawner::spawn(command).await.map_err(|err| {
            LaunchError::new(format!(
                "cannot start worker {} of pool {}: `{}`: {err}",
                spec.worker_id,
                spec.pool,
                interpreter.executable.display()
            ))
        })?;
        if let Some(pid) = child.id() {
            on_spawned(pid);
        }
        if let Some(secret) = secret {
            // The child has its own copy of the read end; the secret follows, then end-of-file.
            secret.hand_over().map_err(|err| {
                LaunchError::new(format!(
                    "cannot hand worker {} its secret: {err}",
                    spec.worker_id
                ))
            })?;
        }
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
            self.settings.stderr_drain,
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
/// `Debug` shows the names of the extra variables but not their values, and never the secret.
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
    secret: Option<String>,
}

impl SpawnOptions {
    /// Options for a worker started with `--transport <transport>`, no extra environment, and
    /// stdin/stdout connected to `/dev/null` (see [`frame_pipes`](Self::frame_pipes)).
    pub fn new(transport: impl Into<String>) -> Self {
        SpawnOptions {
            transport: transport.into(),
            env: Vec::new(),
            frame_pipes: false,
            secret: None,
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

    /// Hands the worker a secret (a text such as the hex of an HMAC key) on an inherited pipe
    /// instead of its environment or command line, both of which other processes of the same
    /// user can read for the worker's whole life (`/proc/<pid>/environ`, `/proc/<pid>/cmdline`).
    ///
    /// The worker finds the pipe's descriptor in `PYPOOL_SECRET_FD`; the runtime reads the
    /// secret once, closes the descriptor and removes the variable before it imports the
    /// application, so neither the app nor anything it starts inherits it.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
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
            .field("secret", &self.secret.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The environment variable that names the descriptor of the secret pipe
/// ([`SpawnOptions::secret`]).
pub const ENV_SECRET_FD: &str = "PYPOOL_SECRET_FD";

/// A close-on-exec pipe that carries a worker's secret: the child inherits the read end (numbered
/// 3 or above, so the child's stdio set-up cannot overwrite it); the secret goes into the write
/// end only after the child exists.
struct SecretPipe {
    read: OwnedFd,
    write: OwnedFd,
    secret: Vec<u8>,
}

impl SecretPipe {
    fn new(secret: &[u8]) -> io::Result<SecretPipe> {
        // A pipe holds at least 4 KiB (64 KiB on Linux): a secret of this size never blocks.
        if secret.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a worker secret longer than 4096 bytes",
            ));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which outlives the call.
        #[cfg(target_os = "linux")]
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        // SAFETY: as above. Without pipe2 there is a short window in which a fork elsewhere in
        // the process could inherit the descriptors; the secret goes in only after both are
        // marked close-on-exec.
        #[cfg(not(target_os = "linux"))]
        let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        #[cfg(not(target_os = "linux"))]
        for fd in [&read, &write] {
            // SAFETY: fcntl on a descriptor we own.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let read = if read.as_raw_fd() < 3 {
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
            let fd = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is new and ours.
            unsafe { OwnedFd::from_raw_fd(fd) }
        } else {
            read
        };
        Ok(SecretPipe {
            read,
            write,
            secret: secret.to_vec(),
        })
    }

    /// Writes the secret and closes our ends: the worker reads it, then end-of-file.
    ///
    /// Written while we still hold the read end, so the write cannot meet a pipe without readers
    /// (EPIPE, or SIGPIPE in a program that does not ignore it) even if the worker already died.
    fn hand_over(self) -> io::Result<()> {
        let written = io::Write::write_all(&mut std::fs::File::from(self.write), &self.secret);
        drop(self.read);
        written
    }
}

/// Lets `command`'s child inherit the secret pipe's read end and tells it which descriptor that
/// is.
fn hand_over(command: &mut Command, secret: &OwnedFd) {
    let fd = secret.as_raw_fd();
    command.env(ENV_SECRET_FD, fd.to_string());
    // SAFETY: runs in the forked child before exec; fcntl is async-signal-safe and allocates
    // nothing. `fd` is open in the parent until the spawn has returned, so it is open here.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
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
