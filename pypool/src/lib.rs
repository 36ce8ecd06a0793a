//! pypool: pools of long-lived Python worker processes for Rust services.
//!
//! A Rust program keeps a [`Pool`] of Python processes and calls plain Python functions in them
//! (`pool.call("predict", args)`, or `pool.session("user-7").call(...)` for calls that share
//! state). The pool starts the interpreters concurrently, counts a worker ready only after its
//! handshake, queues callers fairly with checkout and call time limits, replaces crashed, hung
//! and worn-out workers, never hands a late reply to the wrong caller, and shuts down leaving no
//! process behind.
//!
//! This facade re-exports [`pool_core`]'s API (everything at the crate root: [`Pool`],
//! [`PoolConfig`], [`Session`], [`Payload`], [`Error`], [`PoolStats`], …) and, behind features,
//! the transports:
//!
//! | feature | module | transport name |
//! |---|---|---|
//! | `stdio` (default) | `stdio` | `"stdio"`: workers are child processes, frames over their stdin/stdout |
//! | `ipc` (default) | `ipc` | `"ipc"`: workers connect back over an authenticated Unix socket |
//! | `zmq` | `zmq` | `"zmq"`: ZeroMQ: local workers over `ipc://` by name; remote workers that join over `tcp://` with [`zmq::ZmqLauncher::remote`] (the workers need pyzmq) |
//! | `testkit` | `testkit` | `"fake"`: in-process fake workers for tests |
//! | `metrics` | `metrics` | publishes pool statistics through the `metrics` crate |
//! | — | — | the `pypool` command-line tool is the `pypool-cli` crate (`cargo install pypool-cli`) |
//!
//! A program that wants to choose its transport in its configuration uses [`launcher`] with a
//! name; [`transports`] lists the names compiled in.
//!
//! The Python side is the `pypool_worker` runtime; handlers are plain functions decorated with
//! `@handler`. The stdio transport embeds the runtime, so a bare `python3` is all a machine needs.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use pypool::{Affinity, Pool, PoolConfig};
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // The transport by name, e.g. from a configuration file: "stdio" unless told otherwise.
//!     let launcher = pypool::launcher("stdio")?;
//!     let config = PoolConfig::new("handlers.py").name("models").size(4);
//!     let pool = Pool::start(config, launcher).await?;
//!
//!     // Any free worker.
//!     let score = pool.call("predict", json!({"features": [1.0, 2.0, 3.0]})).await?;
//!     println!("score: {}", score.value);
//!
//!     // A session keeps its calls on the worker that holds its state.
//!     let session = pool.session_with("user-7", Affinity::Strict);
//!     session.call("remember", json!({"key": "name", "value": "Ada"})).await?;
//!     session.end().await;
//!
//!     println!("p99: {} µs", pool.stats().call_time.p99_us);
//!     pool.shutdown(Duration::from_secs(5)).await;
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]

use std::fmt;
use std::sync::Arc;

pub use pool_core::*;

#[cfg(feature = "stdio")]
pub use transport_stdio as stdio;

/// Local process supervision shared by the spawning transports (interpreter resolution, the
/// embedded runtime, process trees): `pool-process`.
#[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
pub use pool_process as process;

#[cfg(feature = "ipc")]
pub use transport_ipc as ipc;

#[cfg(feature = "zmq")]
pub use transport_zmq as zmq;

#[cfg(feature = "testkit")]
pub use pool_testkit as testkit;

#[cfg(feature = "metrics")]
pub mod metrics;

/// One transport that can be chosen by name at run time.
struct Transport {
    name: &'static str,
    make: fn() -> Arc<dyn Launcher>,
}

/// Every transport compiled into this build, in order of preference. Adding a transport is one
/// entry here (behind its feature).
const REGISTRY: &[Transport] = &[
    #[cfg(all(feature = "stdio", unix))]
    Transport {
        name: "stdio",
        make: || Arc::new(transport_stdio::StdioLauncher::new()),
    },
    #[cfg(all(feature = "ipc", unix))]
    Transport {
        name: "ipc",
        make: || Arc::new(transport_ipc::IpcLauncher::new()),
    },
    #[cfg(all(feature = "zmq", unix))]
    Transport {
        name: "zmq",
        make: || Arc::new(transport_zmq::ZmqLauncher::new()),
    },
    #[cfg(feature = "testkit")]
    Transport {
        name: "fake",
        make: || pool_testkit::FakeLauncher::builder().build(),
    },
];

const NAMES: [&str; REGISTRY.len()] = {
    let mut names = [""; REGISTRY.len()];
    let mut i = 0;
    while i < REGISTRY.len() {
        names[i] = REGISTRY[i].name;
        i += 1;
    }
    names
};

/// Transports pypool knows about: name, the feature that brings it in, whether that feature is
/// on in this build.
const KNOWN: &[(&str, &str, bool)] = &[
    ("stdio", "stdio", cfg!(feature = "stdio")),
    ("ipc", "ipc", cfg!(feature = "ipc")),
    ("zmq", "zmq", cfg!(feature = "zmq")),
    ("fake", "testkit", cfg!(feature = "testkit")),
];

/// The names of the transports compiled into this build, in order of preference: `"stdio"`
/// (feature `stdio`, on Unix), `"ipc"` (feature `ipc`, on Unix), `"zmq"` (feature `zmq`, on
/// Unix; local workers) and `"fake"` (feature `testkit`). [`launcher`] accepts exactly these.
///
/// ```
/// for name in pypool::transports() {
///     assert!(pypool::launcher(name).is_ok());
/// }
/// ```
pub fn transports() -> &'static [&'static str] {
    &NAMES
}

/// A new launcher for the transport called `name` (see [`transports`]), with its default
/// settings, ready for [`Pool::start`].
///
/// Use it when the transport is chosen at run time (a configuration file, a command-line flag);
/// when it is fixed, constructing the launcher directly (`pypool::stdio::StdioLauncher::new()`)
/// gives access to its own settings. The `"fake"` launcher is
/// `testkit::FakeLauncher::builder().build()`: fake workers with the standard scripted commands.
///
/// ```
/// let Err(err) = pypool::launcher("carrier-pigeon") else { panic!("no such transport") };
/// assert_eq!(err.name, "carrier-pigeon");
/// assert!(err.to_string().contains("unknown transport"));
/// ```
pub fn launcher(name: &str) -> Result<Arc<dyn Launcher>, UnknownTransport> {
    REGISTRY
        .iter()
        .find(|transport| transport.name == name)
        .map(|transport| (transport.make)())
        .ok_or_else(|| UnknownTransport {
            name: name.to_owned(),
        })
}

/// [`launcher`] was asked for a transport this build does not have.
///
/// Its message says whether the name is unknown, needs a feature that was not compiled in, or
/// names a transport that is not implemented yet, and lists the ones available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownTransport {
    /// The name that was asked for.
    pub name: String,
}

impl UnknownTransport {
    /// The transports that are available instead (same as [`transports`]).
    pub fn available(&self) -> &'static [&'static str] {
        transports()
    }
}

impl UnknownTransport {
    /// Why the transport is missing, without the list of available ones: unknown, not compiled
    /// in (and which feature brings it), or not implemented yet.
    pub fn reason(&self) -> String {
        match KNOWN.iter().find(|(name, _, _)| *name == self.name) {
            Some((name, _, true)) => format!(
                "transport '{name}' is not implemented yet (on this platform or in this version)"
            ),
            Some((name, feature, false)) => format!(
                "transport '{name}' is not compiled in: build pypool with the `{feature}` feature"
            ),
            None => format!("unknown transport '{}'", self.name),
        }
    }
}

impl fmt::Display for UnknownTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())?;
        if NAMES.is_empty() {
            write!(
                f,
                "; this build has no transport (enable the `stdio` feature)"
            )
        } else {
            write!(f, "; available: {}", NAMES.join(", "))
        }
    }
}

impl std::error::Error for UnknownTransport {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_transport_launches_under_its_name() {
        for name in transports() {
            assert_eq!(
                launcher(name).map(|l| l.name().to_owned()),
                Ok(name.to_string())
            );
        }
    }

    #[cfg(all(feature = "stdio", unix))]
    #[test]
    fn stdio_is_first_when_compiled_in() {
        assert_eq!(transports().first(), Some(&"stdio"));
    }

    #[test]
    fn errors_say_what_to_do() {
        let unknown = launcher("pigeon").err().map(|e| e.to_string());
        assert!(unknown.is_some_and(|m| m.starts_with("unknown transport 'pigeon'")));
        let zmq = launcher("zmq")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        if cfg!(all(feature = "zmq", unix)) {
            assert!(zmq.is_empty(), "{zmq}");
        } else if cfg!(feature = "zmq") {
            assert!(zmq.contains("not implemented yet"), "{zmq}");
        } else {
            assert!(zmq.contains("`zmq` feature"), "{zmq}");
        }
    }
}
