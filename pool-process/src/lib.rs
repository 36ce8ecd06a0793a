//! Local process supervision for pypool: the one place that starts, watches and ends worker
//! processes on this machine.
//!
//! pypool keeps pools of long-lived Python processes for Rust services. The pool engine in
//! `pool-core` owns all policy; transports only launch workers and move frames. Every transport
//! that spawns local workers (`transport-stdio`, `transport-ipc`, and `transport-zmq` in local
//! mode) starts them through this crate, so they all get the same guarantees and none of them
//! depends on another:
//!
//! * **The interpreter** ([`Interpreter`]): the default `python3` means `$PYPOOL_PYTHON`, else
//!   the active virtualenv (`$VIRTUAL_ENV/bin/python`), else `python3` in `PATH`
//!   ([`choose_python`]); it is resolved once per launcher to the binary in `sys.executable`, so
//!   version-manager shims are not paid for by every worker, and it may run under a wrapper
//!   command ([`ProcessLauncher::wrapper`]: `uv run`, a container's entry point); a missing or
//!   non-Python-3 interpreter is a clear [`pool_core::LaunchError`] that names it and why it was
//!   chosen.
//! * **The runtime** ([`runtime`]): the `pypool_worker` package is embedded; if the interpreter
//!   cannot import the same version, it is written to a private cache directory and put on
//!   `PYTHONPATH`. A bare `python3` with nothing installed works.
//! * **Spawning** ([`ProcessLauncher`]): from one long-lived thread, so that the Linux
//!   parent-death signal means "the pool's process died"; each worker leads its own process
//!   group; thread limits for numeric libraries; unbuffered output.
//! * **Owning the tree** ([`WorkerProcess`]): whatever a worker starts dies with it. The handle
//!   sees the worker's exit from the process itself (never from a pipe a descendant may hold),
//!   kills what is left of its process group before reaping it (the unreaped leader keeps the
//!   group id from being reused), signals with TERM→KILL escalation, never signals a reaped pid,
//!   keeps a bounded stderr tail and samples resident memory.
//!
//! Unix only for process control; on other platforms only [`runtime`] is available.
#![warn(missing_docs)]

#[cfg(unix)]
mod interpreter;
#[cfg(unix)]
mod launch;
#[cfg(unix)]
mod process;
pub mod runtime;
#[cfg(unix)]
mod spawner;

#[cfg(unix)]
pub use interpreter::{
    choose as choose_python, Interpreter, PythonSource, DEFAULT_PYTHON, ENV_PYTHON,
};
#[cfg(unix)]
pub use launch::{
    ProcessLauncher, SpawnOptions, SpawnedWorker, DEFAULT_STDERR_DRAIN, ENV_SECRET_FD,
    THREAD_LIMIT_VARS,
};
#[cfg(unix)]
pub use process::WorkerProcess;
pub use runtime::{materialize_runtime, RUNTIME_VERSION};
