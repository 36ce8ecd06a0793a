//! Stdio transport for pypool: launches a Python worker and exchanges frames over its
//! stdin/stdout.
//!
//! pypool keeps pools of long-lived Python processes for Rust services. The pool engine in
//! `pool-core` owns all policy (handshake, queueing, deadlines, health checks, crash recovery,
//! recycling, shutdown); a transport only starts processes and moves frames. This crate is the
//! simplest transport: [`StdioLauncher`] implements [`pool_core::Launcher`] by running
//! `python -m pypool_worker --app <app> --transport stdio` and framing protocol v1 (see
//! `PROTOCOL.md`) on the child's pipes — stdin carries frames to the worker, stdout frames back,
//! and stderr is free text that becomes `tracing` events and a bounded tail for error messages.
//!
//! What it takes care of, so that the pool does not have to:
//!
//! * **The interpreter**: `python3` is resolved once (per launcher) to the binary in
//!   `sys.executable`, so version-manager shims are not paid for by every worker; a missing or
//!   non-Python-3 interpreter is a clear [`pool_core::LaunchError`].
//! * **The runtime**: the `pypool_worker` package is embedded ([`runtime`]); if the interpreter
//!   cannot import the same version, it is written to a private cache directory and put on
//!   `PYTHONPATH`. A bare `python3` with nothing installed works.
//! * **The process**: its own process group (signals reach everything the worker started), on
//!   Linux a parent-death signal so that a killed pool leaves no orphans, thread-pool limits for
//!   numeric libraries, unbuffered output, and a [`StdioProcess`] handle that kills the group on
//!   drop and reaps every child.
//!
//! The launcher does not wait for the worker's HELLO: it returns as soon as the process runs.
//!
//! Other local transports reuse all of the above: [`StdioLauncher::spawn_worker`] starts a
//! worker with another `--transport` and extra environment ([`SpawnOptions`]) and returns its
//! [`StdioProcess`] (`transport-ipc` launches its workers this way).
//!
//! Unix only for process control; on other platforms only [`runtime`] is available.
#![warn(missing_docs)]

#[cfg(unix)]
mod interpreter;
#[cfg(unix)]
mod launcher;
#[cfg(unix)]
mod process;
pub mod runtime;
#[cfg(unix)]
mod spawner;

#[cfg(unix)]
pub use interpreter::Interpreter;
#[cfg(unix)]
pub use launcher::{
    SpawnOptions, SpawnedWorker, StdioLauncher, DEFAULT_STDERR_DRAIN, THREAD_LIMIT_VARS,
};
#[cfg(unix)]
pub use process::StdioProcess;
pub use runtime::{materialize_runtime, RUNTIME_VERSION};
