#![doc = include_str!("../README.md")]
//!
//! # This crate
//!
//! `pypool` re-exports `pool_core`'s API at its root ([`Pool`], [`PoolConfig`], [`Session`],
//! [`Payload`], [`Error`], [`ErrorKind`], [`PoolStats`], …), adds [`builder`] and [`launcher`]
//! (transports by name), and the transports behind features (see the table above).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use pool_core::*;

#[cfg(feature = "stdio")]
#[cfg_attr(docsrs, doc(cfg(feature = "stdio")))]
pub use transport_stdio as stdio;

/// Local process supervision shared by the spawning transports (interpreter resolution, the
/// embedded runtime, process trees): `pool-process`.
#[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "stdio", feature = "ipc", feature = "zmq")))
)]
pub use pool_process as process;

#[cfg(feature = "ipc")]
#[cfg_attr(docsrs, doc(cfg(feature = "ipc")))]
pub use transport_ipc as ipc;

#[cfg(feature = "zmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "zmq")))]
pub use transport_zmq as zmq;

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub use pool_testkit as testkit;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
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

/// A transport that is not compiled in is a configuration mistake: [`Error::InvalidConfig`], so
/// that `pypool::launcher(name)?` works in a function returning [`pypool::Result`](Result).
impl From<UnknownTransport> for Error {
    fn from(err: UnknownTransport) -> Self {
        Error::InvalidConfig(err.to_string())
    }
}

/// A [`Pool`] to start: the [`PoolConfig`] setters, plus the transport, in one chain. Start with
/// [`builder`] (or [`PoolBuilder::from_config`] for a configuration read from a file).
///
/// The transport is `"stdio"` unless told otherwise ([`transport`](Self::transport) by name, or
/// [`launcher`](Self::launcher) for a launcher of your own).
///
/// ```no_run
/// # async fn run() -> pypool::Result<()> {
/// use std::time::Duration;
///
/// let pool = pypool::builder("handlers.py")
///     .size(8)
///     .checkout_timeout(Duration::from_secs(5))
///     .require_commands(["predict"])
///     .start()
///     .await?;
/// # drop(pool); Ok(()) }
/// ```
#[must_use = "a builder does nothing until `start` is awaited"]
pub struct PoolBuilder {
    config: PoolConfig,
    transport: String,
    launcher: Option<Arc<dyn Launcher>>,
    #[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
    wrapper: Vec<String>,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("config", &self.config)
            .field("transport", &self.transport)
            .field(
                "launcher",
                &self.launcher.as_ref().map(|l| l.name().to_owned()),
            )
            .finish_non_exhaustive()
    }
}

/// A [`PoolBuilder`] for `app` (a dotted module name or a path to a `.py` file), with every
/// default and the `"stdio"` transport: `pypool::builder("handlers.py").size(8).start().await`.
pub fn builder(app: impl Into<String>) -> PoolBuilder {
    PoolBuilder::from_config(PoolConfig::new(app))
}

macro_rules! forward {
    ($($name:ident: $ty:ty),* $(,)?) => {
        impl PoolBuilder {
            $(
                #[doc = concat!("Sets [`PoolConfig::", stringify!($name), "`].")]
                pub fn $name(mut self, value: $ty) -> Self {
                    self.config = self.config.$name(value);
                    self
                }
            )*
        }
    };
}

forward! {
    size: usize,
    min_ready: usize,
    max_overflow: usize,
    overflow_idle: Duration,
    max_waiters: usize,
    checkout_timeout: Duration,
    call_timeout: Duration,
    cancel_grace: Duration,
    start_timeout: Duration,
    handshake_timeout: Duration,
    launch_timeout: Duration,
    ping_interval: Duration,
    ping_timeout: Duration,
    max_missed: u32,
    max_calls: u64,
    max_calls_jitter: u64,
    max_age: Duration,
    max_age_jitter: Duration,
    max_rss: u64,
    restart_backoff: Duration,
    restart_backoff_max: Duration,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    stable_uptime: Duration,
    session_ttl: Duration,
    max_sessions: usize,
    default_affinity: Affinity,
    max_frame: usize,
    max_reply_bytes: usize,
    stream_window: u32,
    max_in_flight: usize,
    prefetch: usize,
    prefetch_wait: Duration,
    stop_grace: Duration,
    maintenance_interval: Duration,
    stderr_tail_lines: usize,
}

impl PoolBuilder {
    /// A builder that starts from `config` (read from a file, say) with the `"stdio"` transport.
    ///
    /// ```no_run
    /// # async fn run(text: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// let config: pypool::PoolConfig = toml::from_str(text)?;
    /// let pool = pypool::PoolBuilder::from_config(config).transport("ipc").start().await?;
    /// # drop(pool); Ok(()) }
    /// ```
    pub fn from_config(config: PoolConfig) -> Self {
        PoolBuilder {
            config,
            transport: "stdio".to_owned(),
            launcher: None,
            #[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
            wrapper: Vec::new(),
        }
    }

    /// Sets [`PoolConfig::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config = self.config.name(name);
        self
    }

    /// Sets [`PoolConfig::python`]: the interpreter (by default `$PYPOOL_PYTHON`, the active
    /// virtualenv, or `python3` in `PATH`).
    pub fn python(mut self, python: impl Into<std::path::PathBuf>) -> Self {
        self.config = self.config.python(python);
        self
    }

    /// Adds one environment variable for the workers ([`PoolConfig::env`]).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config = self.config.env(key, value);
        self
    }

    /// Sets [`PoolConfig::cwd`].
    pub fn cwd(mut self, cwd: impl Into<std::path::PathBuf>) -> Self {
        self.config = self.config.cwd(cwd);
        self
    }

    /// Sets [`PoolConfig::require_commands`]: [`start`](Self::start) fails unless the app serves
    /// every one of them.
    pub fn require_commands<I, S>(mut self, commands: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config = self.config.require_commands(commands);
        self
    }

    /// Changes anything else of the configuration.
    ///
    /// ```
    /// let builder = pypool::builder("handlers.py").configure(|config| config.size(2));
    /// assert_eq!(builder.config().size, 2);
    /// ```
    pub fn configure(mut self, change: impl FnOnce(PoolConfig) -> PoolConfig) -> Self {
        self.config = change(self.config);
        self
    }

    /// The configuration so far.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The transport by name (see [`transports`]); `"stdio"` unless told otherwise. A name that
    /// is not compiled in makes [`start`](Self::start) fail with [`Error::InvalidConfig`].
    pub fn transport(mut self, name: impl Into<String>) -> Self {
        self.transport = name.into();
        self.launcher = None;
        self
    }

    /// A launcher of your own (a transport's with its own settings, a remote zmq launcher, a
    /// fake one in tests) instead of a transport by name.
    pub fn launcher(mut self, launcher: Arc<dyn Launcher>) -> Self {
        self.launcher = Some(launcher);
        self
    }

    /// Runs the interpreter under a command (for the process transports, by name):
    /// `["uv", "run", "--"]`, `["nice", "-n", "10"]`, a container's entry point. See
    /// [`process::ProcessLauncher::wrapper`] for what the wrapper must do.
    #[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
    #[cfg_attr(
        docsrs,
        doc(cfg(any(feature = "stdio", feature = "ipc", feature = "zmq")))
    )]
    pub fn python_wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Starts the pool ([`Pool::start`]): resolves when `min_ready` workers are ready.
    pub async fn start(self) -> Result<Pool> {
        let launcher = match self.launcher {
            Some(launcher) => launcher,
            #[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
            None if !self.wrapper.is_empty() => {
                let processes = process::ProcessLauncher::new().wrapper(self.wrapper);
                launcher_with(&self.transport, processes)?
            }
            None => launcher(&self.transport)?,
        };
        Pool::start(self.config, launcher).await
    }
}

/// [`launcher`] for a process transport, with a [`process::ProcessLauncher`] of your own (an
/// interpreter [wrapper](process::ProcessLauncher::wrapper), say). Other transports are refused.
#[cfg(any(feature = "stdio", feature = "ipc", feature = "zmq"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "stdio", feature = "ipc", feature = "zmq")))
)]
pub fn launcher_with(
    name: &str,
    processes: process::ProcessLauncher,
) -> Result<Arc<dyn Launcher>, UnknownTransport> {
    let _ = &processes;
    match name {
        #[cfg(all(feature = "stdio", unix))]
        "stdio" => Ok(Arc::new(transport_stdio::StdioLauncher::with_processes(
            processes,
        ))),
        #[cfg(all(feature = "ipc", unix))]
        "ipc" => Ok(Arc::new(
            transport_ipc::IpcLauncher::new().process_launcher(processes),
        )),
        #[cfg(all(feature = "zmq", unix))]
        "zmq" => Ok(Arc::new(
            transport_zmq::ZmqLauncher::new().process_launcher(processes),
        )),
        _ => Err(UnknownTransport {
            name: name.to_owned(),
        }),
    }
}

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
