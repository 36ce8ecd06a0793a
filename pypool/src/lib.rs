//! pypool: pools of long-lived Python worker processes for Rust services.
//!
//! This facade re-exports [`pool_core`]'s API and, behind features, the transports:
//! `stdio` (default), `ipc`, `zmq`, and the `testkit` fakes.

pub use pool_core::*;

#[cfg(feature = "stdio")]
pub use transport_stdio as stdio;

#[cfg(feature = "ipc")]
pub use transport_ipc as ipc;

#[cfg(feature = "zmq")]
pub use transport_zmq as zmq;

#[cfg(feature = "testkit")]
pub use pool_testkit as testkit;
