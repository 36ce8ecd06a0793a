//! pool-testkit: fakes and shared test suites for pypool.
//!
//! * [`FakeLauncher`] starts "workers" that are tokio tasks speaking the real wire protocol over
//!   in-memory channels, following a [`Script`]: start delays and failures, per-command latency,
//!   results, Python-style errors, crashes, hangs and garbage frames. Because they live on tokio
//!   time, pool logic tests run with `start_paused = true`: deterministic, no real sleeping.
//! * [`conformance`] is the transport conformance suite: every transport crate runs it against
//!   its own launcher with real Python workers.
//!
//! * [`tree`] (Linux) is the process-tree suite: every transport that spawns local workers proves
//!   with it that whatever a worker starts dies with the worker, on every way a worker ends.
//! * [`bench`] holds what the transport benches share.
//!
//! Fakes are for pool logic. Transports are tested with real processes.
#![warn(missing_docs)]

pub mod bench;
mod channel;
pub mod conformance;
mod fake;
mod script;
#[cfg(target_os = "linux")]
pub mod tree;

pub use channel::{memory_channel, PeerEnd};
pub use fake::{FakeLauncher, FakeLauncherBuilder, FakeTarget};
pub use script::{Action, FakeCall, FakeReply, Script, StartBehavior};
