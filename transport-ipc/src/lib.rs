//! Local-socket transport for pypool: workers connect back to a per-pool socket (a Unix domain
//! socket; a named pipe on Windows) and authenticate before their handshake.
//!
//! pypool keeps pools of long-lived Python processes for Rust services. The pool engine in
//! `pool-core` owns all policy; a transport only starts processes and moves frames. This crate's
//! [`IpcLauncher`] implements [`pool_core::Launcher`] (name `"ipc"`): the pool listens on one
//! socket per launcher, starts each worker with `python -m pypool_worker --app <app> --transport
//! ipc`, and the worker connects to the socket named by `PYPOOL_IPC_PATH`.
//!
//! Frames are protocol v1 (`PROTOCOL.md`): a 4-byte big-endian length and the body, exactly as
//! on stdio, so the worker's stdin, stdout and stderr stay free (stdout is `/dev/null`, stderr
//! becomes `tracing` events and the tail in error messages).
//!
//! # Authentication and pairing
//!
//! A local socket can be reached by other processes of the same user, so every connection is
//! treated as a stranger until it proves otherwise, before anything else happens on it:
//!
//! 1. On Unix the kernel's peer credentials (`SO_PEERCRED`) must show our own uid.
//! 2. The pool sends CHALLENGE with a fresh nonce; the peer must answer AUTH with the HMAC-SHA256
//!    of the nonce under the socket's secret, within the auth timeout (default 5 s), and send
//!    nothing else first ([`pool_core::protocol::auth::challenge`]). The secret is 32 random
//!    bytes per socket, handed to each worker on an inherited pipe that its runtime reads once
//!    and closes before importing the application: it is never in a worker's environment
//!    (`/proc/<pid>/environ`) or argv.
//! 3. The peer's pid (again from the kernel) must be that of a worker this launcher started and
//!    is waiting for: that is how a connection is paired with its launch.
//!
//! A connection that fails any step is closed, logged as a `tracing` warning (target
//! `pypool::ipc`) and never becomes a worker. Each connection is checked in its own task,
//! independently of the accept loop, so a silent or hostile client delays nobody else.
//!
//! # Processes
//!
//! Local process launching is `pool-process`'s, shared with every spawning transport:
//! [`pool_process::ProcessLauncher`] resolves the interpreter, provides the embedded
//! `pypool_worker` runtime, owns the worker's whole process tree, arms the parent-death signal
//! (Linux), keeps its stderr tail and reaps it; this crate adds the socket, the secret and the
//! pairing. A launch fails, with the worker's stderr tail, if the worker
//! exits before it connects or does not connect within the connect timeout (default 30 s).
//!
//! # Platforms
//!
//! Unix (tested on Linux). The socket lives in a private directory (mode 0700) under
//! `$XDG_RUNTIME_DIR` or the temporary directory, as `pool.sock` (mode 0600); both are removed
//! on [`Launcher::shutdown`](pool_core::Launcher::shutdown) and on drop. On Windows the listener
//! side is a named pipe (compiled, untested), but launching fails with a clear error: process
//! control in `transport-stdio` and the Python runtime's socket client are Unix-only so far.
#![warn(missing_docs)]

mod endpoint;
mod launcher;
mod stream;

pub use launcher::{IpcLauncher, DEFAULT_AUTH_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, ENV_IPC_PATH};
