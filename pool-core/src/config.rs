//! Pool configuration: sizes, time limits, health, recycling and session settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::Error;
use crate::protocol::DEFAULT_MAX_FRAME;

/// How a session's calls are placed on workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// Any worker; the session is tracked for statistics only.
    #[default]
    None,
    /// The worker that served the session last, when it is free; any other otherwise.
    Prefer,
    /// Always the same worker. If it is gone, calls fail with
    /// [`Error::SessionWorkerLost`](crate::Error::SessionWorkerLost) rather than silently moving
    /// to a worker that lacks the session's state. A call waits (within its time limits) while
    /// the session's worker is busy.
    Strict,
    /// Like `Strict`, but a call whose session's worker is busy fails at once with
    /// [`Error::WorkerBusy`](crate::Error::WorkerBusy) instead of waiting, for callers that would
    /// rather shed load than queue.
    StrictNoWait,
}

impl Affinity {
    /// Whether the session's calls stay on one worker (`Strict` or `StrictNoWait`).
    pub fn is_strict(self) -> bool {
        matches!(self, Affinity::Strict | Affinity::StrictNoWait)
    }
}

/// Everything a pool can be told. Build it with [`PoolConfig::new`] and the setters, fill the
/// public fields directly, or deserialize it (`serde`) from the file operators write;
/// [`PoolConfig::validate`] says what cannot work.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use pool_core::PoolConfig;
///
/// let config = PoolConfig::new("handlers.py")
///     .name("models")
///     .size(3)
///     .max_overflow(2)
///     .checkout_timeout(Duration::from_secs(5));
/// assert!(config.validate().is_ok());
/// ```
///
/// # From a configuration file
///
/// Field names are the setters' names; every field but `app` may be left out (its default is
/// used). Durations are written as people write them (`"500ms"`, `"30s"`, `"2m"`, `"1h 30m"`,
/// parsed by `humantime`), byte sizes as numbers or with a unit (`"2GiB"`, `"512MB"`); a field
/// pypool does not know is an error, not silently ignored. TOML here; YAML and JSON work the same
/// through their serde crates.
///
/// ```
/// use std::time::Duration;
/// use pool_core::{Affinity, PoolConfig};
///
/// let config: PoolConfig = toml::from_str(r#"
///     app = "handlers.py"
///     name = "models"
///     size = 8
///     checkout_timeout = "500ms"
///     call_timeout = "2m"
///     max_age = "1h 30m"
///     max_rss = "2GiB"
///     default_affinity = "strict"
///     require_commands = ["predict", "recall"]
///     env = { MODEL_DIR = "/srv/models" }
/// "#).expect("a valid configuration");
///
/// assert_eq!(config.size, 8);
/// assert_eq!(config.checkout_timeout, Duration::from_millis(500));
/// assert_eq!(config.call_timeout, Duration::from_secs(120));
/// assert_eq!(config.max_age, Some(Duration::from_secs(5400)));
/// assert_eq!(config.max_rss, Some(2 << 30));
/// assert_eq!(config.default_affinity, Affinity::Strict);
/// assert_eq!(config.ping_interval, Duration::from_secs(5)); // a default
/// assert!(config.validate().is_ok());
///
/// // A typo is caught, with the field's name.
/// let typo = toml::from_str::<PoolConfig>("app = 'h.py'\nmax_waiter = 5");
/// assert!(typo.unwrap_err().to_string().contains("unknown field `max_waiter`"));
/// ```
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default = "PoolConfig::unset", deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool's name in logs, errors and metrics. Names need not be unique; there is no
    /// global registry. Default: `pool-N`.
    pub name: String,
    /// The Python application: a dotted module name or a path to a `.py` file. Required.
    pub app: String,
    /// The interpreter: a name looked up in `PATH`, or a path. Default: `python3`, which the
    /// process transports resolve as `$PYPOOL_PYTHON`, else the active virtualenv's
    /// (`$VIRTUAL_ENV/bin/python`), else `python3` in `PATH`. (A command to run the interpreter
    /// under, such as `uv run`, is a launcher setting: `pool_process::ProcessLauncher::wrapper`.)
    pub python: PathBuf,
    /// Commands the app must serve: [`Pool::start`](crate::Pool::start) fails with
    /// [`Error::StartFailed`](crate::Error::StartFailed), naming the missing ones (with a "did you
    /// mean"), as soon as the first worker's handshake shows one is missing. Checking needs a
    /// ready worker, so with `min_ready` 0 `start` waits for one. Default: none (no check).
    pub require_commands: Vec<String>,
    /// Extra environment for workers.
    pub env: BTreeMap<String, String>,
    /// Working directory for workers.
    pub cwd: Option<PathBuf>,
    /// Permanent workers. Default: 4.
    pub size: usize,
    /// Workers that must be ready before [`Pool::start`](crate::Pool::start) returns. Default: `size`.
    pub min_ready: Option<usize>,
    /// Temporary workers started when callers queue. Default: 0.
    pub max_overflow: usize,
    /// An overflow worker idle this long is retired. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub overflow_idle: Duration,
    /// Callers allowed to wait; the next one gets `Saturated`. Default: 10 000.
    pub max_waiters: usize,
    /// Longest wait for a free worker. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Longest execution of one call. Default: 60 s.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// After CANCEL, how long a worker has to confirm before it is killed. Default: 2 s.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Longest time [`Pool::start`](crate::Pool::start) waits for `min_ready`. Default: 60 s.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Longest time from launch to HELLO. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often idle workers are pinged. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long a ping may go unanswered before it counts as missed. Default: 2 s.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Missed pings in a row that get a worker killed and replaced. Default: 3.
    pub max_missed: u32,
    /// Recycle a worker after this many calls. Default: none.
    pub max_calls: Option<u64>,
    /// Up to this many extra calls, drawn per worker, so workers do not all recycle at once.
    /// Default: 10% of `max_calls`.
    pub max_calls_jitter: Option<u64>,
    /// Recycle a worker after this age (plus up to `max_age_jitter`), even if Strict sessions
    /// are bound to it. Default: none.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Up to this much extra age, drawn per worker, so workers started together do not all
    /// retire together. Default: 10% of `max_age`.
    #[serde(with = "humantime_serde")]
    pub max_age_jitter: Option<Duration>,
    /// Recycle a worker whose resident memory exceeds this many bytes. Default: none.
    #[serde(with = "bytes::option")]
    pub max_rss: Option<u64>,
    /// First delay before relaunching after a failure; doubles up to `restart_backoff_max`.
    /// Default: 100 ms.
    #[serde(with = "humantime_serde")]
    pub restart_backoff: Duration,
    /// Largest relaunch delay. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// Consecutive launch/handshake failures that open the circuit breaker. A worker that dies
    /// within `stable_uptime` of its start counts as a failed launch too. Default: 5.
    pub breaker_threshold: u32,
    /// A worker that lives this long proves that launches work: the count of failed launches is
    /// reset. One that dies sooner counts as a failed launch (backoff, circuit breaker), so a
    /// worker that crashes soon after every start cannot make the pool spawn in a tight loop.
    /// Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub stable_uptime: Duration,
    /// Longest time one launch may take (spawning, and for ipc the worker's connection) before
    /// it counts as failed; the handshake has its own limit. Transports may set their own
    /// ([`Launcher::launch_timeout`](crate::Launcher::launch_timeout)). Default: 60 s.
    #[serde(with = "humantime_serde")]
    pub launch_timeout: Duration,
    /// How long the breaker stays open before one trial launch. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// A session unused this long is ended. Default: 30 min.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Sessions that may be open at once; a call that would open one more fails with
    /// [`Error::TooManySessions`](crate::Error::TooManySessions). Default: no limit.
    pub max_sessions: Option<usize>,
    /// Affinity of sessions opened with [`Pool::session`](crate::Pool::session). Default: `None`.
    pub default_affinity: Affinity,
    /// The largest frame either side may send. A call whose frame would be larger fails with
    /// [`Error::RequestTooLarge`](crate::Error::RequestTooLarge) before it is queued. Default:
    /// 256 MiB.
    #[serde(with = "bytes::size")]
    pub max_frame: usize,
    /// The most a streaming handler's items may add up to when [`call`](crate::Pool::call)
    /// collects them into one reply; beyond it the call is cancelled with
    /// [`Error::ReplyTooLarge`](crate::Error::ReplyTooLarge). Items taken one by one with
    /// [`call_stream`](crate::Pool::call_stream) have no such cap. Default: 256 MiB.
    #[serde(with = "bytes::size")]
    pub max_reply_bytes: usize,
    /// Stream items a worker may send ahead of the consumer (flow control): a worker stops
    /// producing when this many items are waiting to be taken. Default: 16.
    pub stream_window: u32,
    /// Caps the `max_in_flight` a worker announces. Default: no cap.
    pub max_in_flight: Option<usize>,
    /// Calls the pool may queue at a worker beyond those it runs (`max_in_flight`), so that a
    /// busy worker never waits for its next call and its replies go out in batches (Celery
    /// calls it prefetch). How many it actually queues follows the worker's recent pace: as many
    /// as it gets through within `prefetch_wait`, so a worker of long calls gets none, and a
    /// worker busy with a call that has already run longer than that takes no more until it is
    /// back. Calls still go to the least loaded worker first and in arrival order; a queued
    /// call that is cancelled is never run. 0 turns it off. Default: 64.
    ///
    /// The pool cannot know a call is long before it runs, so calls queued at a worker of short
    /// calls wait behind a long one that arrives among them: with commands of very different
    /// lengths on one pool (every 50th call 20 ms, the rest no-ops), prefetch gives 4x the
    /// throughput of short calls but raises their p99 from 26 to 41 ms (BENCHMARKS.md). Where
    /// that tail matters, set 0 here or give the long commands their own pool.
    pub prefetch: usize,
    /// The longest a call queued at a worker (see `prefetch`) should expect to wait for the calls
    /// ahead of it, judged by the worker's recent pace. Default: 1 ms.
    #[serde(with = "humantime_serde")]
    pub prefetch_wait: Duration,
    /// At shutdown, how long a worker has after SHUTDOWN, and again after SIGTERM. Default: 2 s.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// How often the pool looks after idle workers, overflow and sessions. Default: 1 s.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// Lines of worker stderr kept for error messages. Default: 40.
    pub stderr_tail_lines: usize,
}

static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

impl PoolConfig {
    /// A configuration for `app` with every default.
    pub fn new(app: impl Into<String>) -> Self {
        PoolConfig {
            name: format!("pool-{}", NEXT_POOL.fetch_add(1, Ordering::Relaxed)),
            app: app.into(),
            python: PathBuf::from("python3"),
            require_commands: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            size: 4,
            min_ready: None,
            max_overflow: 0,
            overflow_idle: Duration::from_secs(30),
            max_waiters: 10_000,
            checkout_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(2),
            start_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(2),
            max_missed: 3,
            max_calls: None,
            max_calls_jitter: None,
            max_age: None,
            max_age_jitter: None,
            max_rss: None,
            restart_backoff: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(5),
            stable_uptime: Duration::from_secs(10),
            launch_timeout: Duration::from_secs(60),
            session_ttl: Duration::from_secs(30 * 60),
            max_sessions: None,
            default_affinity: Affinity::None,
            max_frame: DEFAULT_MAX_FRAME,
            max_reply_bytes: DEFAULT_MAX_FRAME,
            stream_window: 16,
            max_in_flight: None,
            prefetch: 64,
            prefetch_wait: Duration::from_millis(1),
            stop_grace: Duration::from_secs(2),
            maintenance_interval: Duration::from_secs(1),
            stderr_tail_lines: 40,
        }
    }

    /// What a deserialized configuration starts from: every default, and no app (which
    /// [`validate`](Self::validate) then asks for).
    fn unset() -> Self {
        PoolConfig::new("")
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.app.trim().is_empty() {
            return bad(
                "app is not set: name the Python module or .py file the workers serve".into(),
            );
        }
        if self.size == 0 && self.max_overflow == 0 {
            return bad("size and max_overflow are both 0: the pool could never run a call".into());
        }
        if self.effective_min_ready() > self.size {
            return bad(format!(
                "min_ready ({}) exceeds size ({})",
                self.effective_min_ready(),
                self.size
            ));
        }
        if self.max_missed == 0 {
            return bad("max_missed must be at least 1".into());
        }
        if self.breaker_threshold == 0 {
            return bad("breaker_threshold must be at least 1".into());
        }
        if self.max_frame < 1024 {
            return bad(format!(
                "max_frame ({}) must be at least 1024 bytes",
                self.max_frame
            ));
        }
        if self.max_in_flight == Some(0) {
            return bad("max_in_flight must be at least 1".into());
        }
        if self.stream_window == 0 {
            return bad("stream_window must be at least 1".into());
        }
        if self.max_sessions == Some(0) {
            return bad("max_sessions must be at least 1".into());
        }
        for (name, value) in [
            ("maintenance_interval", self.maintenance_interval),
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("launch_timeout", self.launch_timeout),
        ] {
            if value.is_zero() {
                return bad(format!("{name} must be greater than zero"));
            }
        }
        Ok(())
    }

    /// `min_ready`, defaulted to `size`.
    pub fn effective_min_ready(&self) -> usize {
        self.min_ready.unwrap_or(self.size)
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {
        impl PoolConfig {
            $(
                $(#[$doc])*
                pub fn $field(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`PoolConfig::size`].
    size: usize,
    /// Sets [`PoolConfig::max_overflow`].
    max_overflow: usize,
    /// Sets [`PoolConfig::overflow_idle`].
    overflow_idle: Duration,
    /// Sets [`PoolConfig::max_waiters`].
    max_waiters: usize,
    /// Sets [`PoolConfig::checkout_timeout`].
    checkout_timeout: Duration,
    /// Sets [`PoolConfig::call_timeout`].
    call_timeout: Duration,
    /// Sets [`PoolConfig::cancel_grace`].
    cancel_grace: Duration,
    /// Sets [`PoolConfig::start_timeout`].
    start_timeout: Duration,
    /// Sets [`PoolConfig::handshake_timeout`].
    handshake_timeout: Duration,
    /// Sets [`PoolConfig::ping_interval`].
    ping_interval: Duration,
    /// Sets [`PoolConfig::ping_timeout`].
    ping_timeout: Duration,
    /// Sets [`PoolConfig::max_missed`].
    max_missed: u32,
    /// Sets [`PoolConfig::restart_backoff`].
    restart_backoff: Duration,
    /// Sets [`PoolConfig::restart_backoff_max`].
    restart_backoff_max: Duration,
    /// Sets [`PoolConfig::breaker_threshold`].
    breaker_threshold: u32,
    /// Sets [`PoolConfig::breaker_cooldown`].
    breaker_cooldown: Duration,
    /// Sets [`PoolConfig::stable_uptime`].
    stable_uptime: Duration,
    /// Sets [`PoolConfig::launch_timeout`].
    launch_timeout: Duration,
    /// Sets [`PoolConfig::max_reply_bytes`].
    max_reply_bytes: usize,
    /// Sets [`PoolConfig::stream_window`].
    stream_window: u32,
    /// Sets [`PoolConfig::prefetch`].
    prefetch: usize,
    /// Sets [`PoolConfig::prefetch_wait`].
    prefetch_wait: Duration,
    /// Sets [`PoolConfig::session_ttl`].
    session_ttl: Duration,
    /// Sets [`PoolConfig::default_affinity`].
    default_affinity: Affinity,
    /// Sets [`PoolConfig::max_frame`].
    max_frame: usize,
    /// Sets [`PoolConfig::stop_grace`].
    stop_grace: Duration,
    /// Sets [`PoolConfig::maintenance_interval`].
    maintenance_interval: Duration,
    /// Sets [`PoolConfig::stderr_tail_lines`].
    stderr_tail_lines: usize,
}

impl PoolConfig {
    /// Sets [`PoolConfig::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Sets [`PoolConfig::python`].
    pub fn python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = python.into();
        self
    }
    /// Adds one environment variable for workers.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
    /// Sets [`PoolConfig::cwd`].
    pub fn cwd(mut self, cwd: impl Into<PathBuf>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }
    /// Sets [`PoolConfig::min_ready`].
    pub fn min_ready(mut self, min_ready: usize) -> Self {
        self.min_ready = Some(min_ready);
        self
    }
    /// Sets [`PoolConfig::max_calls`] (and a default jitter of 10%).
    pub fn max_calls(mut self, max_calls: u64) -> Self {
        self.max_calls = Some(max_calls);
        self
    }
    /// Sets [`PoolConfig::max_calls_jitter`].
    pub fn max_calls_jitter(mut self, jitter: u64) -> Self {
        self.max_calls_jitter = Some(jitter);
        self
    }
    /// Sets [`PoolConfig::max_age`].
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }
    /// Sets [`PoolConfig::max_age_jitter`].
    pub fn max_age_jitter(mut self, jitter: Duration) -> Self {
        self.max_age_jitter = Some(jitter);
        self
    }
    /// Sets [`PoolConfig::max_sessions`].
    pub fn max_sessions(mut self, max_sessions: usize) -> Self {
        self.max_sessions = Some(max_sessions);
        self
    }
    /// Sets [`PoolConfig::max_rss`].
    pub fn max_rss(mut self, bytes: u64) -> Self {
        self.max_rss = Some(bytes);
        self
    }
    /// Sets [`PoolConfig::max_in_flight`].
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = Some(max_in_flight);
        self
    }
    /// Sets [`PoolConfig::require_commands`]: `Pool::start` fails unless the app serves them all.
    pub fn require_commands<I, S>(mut self, commands: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.require_commands = commands.into_iter().map(Into::into).collect();
        self
    }
}

/// Byte sizes in configuration files: a number of bytes, or a string with a unit (`"512MiB"`,
/// `"2GB"`, `"64 KiB"`). Decimal units are powers of 1000, binary ones (`KiB`, `MiB`, `GiB`,
/// `TiB`) powers of 1024. Written back as a plain number.
mod bytes {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    /// Parses `"512MiB"`, `"2 GB"`, `"1048576"`.
    pub(crate) fn parse(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number = number.replace('_', "");
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{text}` (use B, KB, MB, GB, KiB, MiB, GiB)"
                ))
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size (e.g. 512MiB, 2GB, 1048576)"))?;
        let bytes = value * factor as f64;
        if !(0.0..=u64::MAX as f64).contains(&bytes) || bytes.fract() != 0.0 {
            return Err(format!("`{text}` is not a whole number of bytes"));
        }
        Ok(bytes as u64)
    }

    struct Size;

    impl Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes or a size such as \"512MiB\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom("a size cannot be negative"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse(v).map_err(E::custom)
        }
    }

    pub(crate) mod size {
        use super::*;
        pub(crate) fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(*v as u64)
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
            let v = d.deserialize_any(Size)?;
            usize::try_from(v).map_err(|_| de::Error::custom("size too large for this platform"))
        }
    }

    pub(crate) mod option {
        use super::*;
        pub(crate) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.serialize_some(v),
                None => s.serialize_none(),
            }
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<u64>, D::Error> {
            struct Opt;
            impl<'de> Visitor<'de> for Opt {
                type Value = Option<u64>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    Size.expecting(f)
                }
                fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                    Ok(None)
                }
                fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                    Ok(None)
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                    d.deserialize_any(Size).map(Some)
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                    Ok(Some(v))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                    Size.visit_i64(v).map(Some)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Size.visit_str(v).map(Some)
                }
            }
            d.deserialize_option(Opt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(bytes::parse("1048576"), Ok(1 << 20));
        assert_eq!(bytes::parse("1MiB"), Ok(1 << 20));
        assert_eq!(bytes::parse("2 GB"), Ok(2_000_000_000));
        assert_eq!(bytes::parse("1.5KiB"), Ok(1536));
        assert_eq!(bytes::parse("64kb"), Ok(64_000));
        assert!(bytes::parse("12 parsecs").is_err());
        assert!(bytes::parse("-1").is_err());
        assert!(bytes::parse("0.5B").is_err());
    }

    #[test]
    fn a_config_survives_a_round_trip_through_json() {
        let config = PoolConfig::new("handlers.py")
            .name("models")
            .max_rss(3 << 30)
            .max_age(Duration::from_millis(90_500))
            .require_commands(["predict"]);
        let text = serde_json::to_string(&config).expect("serializes");
        assert!(text.contains("\"max_age\":\"1m 30s 500ms\""), "{text}");
        let back: PoolConfig = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(back.max_age, config.max_age);
        assert_eq!(back.max_rss, config.max_rss);
        assert_eq!(back.require_commands, ["predict"]);
        assert_eq!(back.checkout_timeout, config.checkout_timeout);
        assert_eq!(back.name, "models");
    }

    #[test]
    fn a_config_without_an_app_is_invalid() {
        let config: PoolConfig = serde_json::from_str("{\"size\": 2}").expect("deserializes");
        let err = config.validate().expect_err("no app");
        assert!(err.to_string().contains("app is not set"), "{err}");
    }
}
