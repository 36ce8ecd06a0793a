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
//! Starting, watching and ending the process (interpreter resolution, the embedded runtime, the
//! process group and everything a worker starts, the parent-death signal, reaping) is
//! `pool-process`'s job, shared with every other spawning transport; this crate adds the frames.
//!
//! Unix only.
#![warn(missing_docs)]

#[cfg(unix)]
mod launcher;

#[cfg(unix)]
pub use launcher::StdioLauncher;
