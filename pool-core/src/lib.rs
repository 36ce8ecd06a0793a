//! pool-core: the engine of pypool.
//!
//! pypool runs pools of long-lived Python worker processes for Rust services. This crate holds
//! everything that is policy: the wire protocol ([`protocol`]), the [`Launcher`] trait that
//! transports implement, the worker connection (handshake, request routing), the [`Pool`]
//! (fair queueing, time limits, health, crash recovery, recycling, shutdown), [`Session`]s,
//! errors and statistics. Transport crates (`transport-stdio`, `transport-ipc`, `transport-zmq`)
//! only launch processes and move frames; the `pypool` facade puts them together.
#![warn(missing_docs)]

mod config;
mod error;
mod launcher;
mod payload;
mod pool;
pub mod protocol;
mod session;
mod stats;
mod worker;

pub use config::{Affinity, PoolConfig};
pub use error::{CallContext, Error, ErrorKind, Result, TimeoutKind, WorkerExit};
pub use launcher::{
    Channel, ExitInfo, FrameReceiver, FrameSender, LaunchError, Launched, Launcher, ProcessHandle,
    WorkerSpec,
};
pub use payload::{placeholder_index, Payload};
pub use pool::{CallOptions, CallStream, MapOptions, MapStream, MapUnordered, Pool, SessionEvent};
pub use session::Session;
pub use stats::{
    BreakerState, CallEvent, CallObserver, CallObserverId, Counters, Gauges, Health, HealthState,
    LatencySummary, PoolStats, PoolStatus, SessionStatus, WorkerState, WorkerStatus,
};
