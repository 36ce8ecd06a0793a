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
//! 2. The peer's pid (again from the kernel) must be that of a worker this launcher started and
//!    is waiting for: that is how a connection is paired with its launch. A launch registers its
//!    worker's pid before handing the worker its secret, without which the worker does not
//!    connect, so an unregistered pid is always a stranger: it is closed at once, in the accept
//!    loop, before any challenge. A flood of connections from the same user costs the pool an
//!    accept and a close each, never a descriptor held or a task, and never delays a worker.
//! 3. The pool sends CHALLENGE with a fresh nonce; the peer must answer AUTH with the HMAC-SHA256
//!    of the nonce under the socket's secret, within the auth timeout (default 5 s), and send
//!    nothing else first ([`pool_core::protocol::auth::challenge`]). The secret is 32 random
//!    bytes per socket, handed to each worker on an inherited pipe that its runtime reads once
//!    and closes before importing the application: it is never in a worker's environment
//!    (`/proc/<pid>/environ`) or argv.
//!
//! A connection that fails any step is closed and never becomes a worker; rejections are logged
//! as `tracing` warnings (target `pypool::ipc`), strangers at most once per 10 s with a count.
//! A launched worker's connection is authenticated in its own task, so a slow one delays nobody
//! else.
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
//! on [`Launcher::shutdown`](pool_core::Launcher::shutdown) and on drop. A pool that died without
//! cleaning up (SIGKILL) leaves its directory behind; the next launcher to listen in the same
//! place removes it, when it is ours (name, owner uid), its owner pid is dead, it holds only
//! `pool.sock` and nothing listens on it. On Windows the listener
//! side is a named pipe (compiled, untested), but launching fails with a clear error: process
//! control in `transport-stdio` and the Python runtime's socket client are Unix-only so far.
#![warn(missing_docs)]

mod endpoint;
mod launcher;
mod stream;

pub use launcher::{IpcLauncher, DEFAULT_AUTH_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, ENV_IPC_PATH};
