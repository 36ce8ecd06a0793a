//! [`ZmqLauncher`]: local workers it spawns, or remote workers that join, over one ROUTER socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pool_core::{LaunchError, Launched, Launcher, WorkerSpec};
use zeromq::util::PeerIdentity;
use zeromq::{RouterSocket, Socket};

use crate::guard::{Guard, GuardConfig};
use crate::hub::{show, Hub, HubConfig};
use crate::key::Key;
use crate::place::Place;

/// How long a connection has to JOIN and answer the CHALLENGE, by default.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a local launch waits, by default, for its worker to join.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Authenticated remote workers kept, by default, while no launch wants one.
pub const DEFAULT_LOBBY: usize = 16;
/// The environment variable that gives a local worker the endpoint to connect to.
pub const ENV_CONNECT: &str = "PYPOOL_ZMQ_CONNECT";
/// The environment variable that gives a local worker its routing identity.
pub const ENV_IDENTITY: &str = "PYPOOL_ZMQ_IDENTITY";

/// After a local worker exited before its link arrived, how long the launch still waits for it.
#[cfg(unix)]
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Where the ROUTER listens.
#[derive(Debug, Clone)]
enum BindAt {
    /// `ipc://` in a fresh private directory (under this one, if given).
    Ipc(Option<PathBuf>),
    /// `tcp://ADDR:PORT` (port 0: any free port).
    Tcp(String),
}

/// Launches pypool workers over ZeroMQ: a ROUTER socket in the pool, a DEALER (pyzmq) in every
/// worker, each with its own routing identity.
///
/// * **Local** ([`ZmqLauncher::new`]): the launcher spawns each worker itself through
///   [`pool_process::ProcessLauncher`] (the worker's whole process tree owned, parent-death
///   signal, stderr tail, reaping), with `--transport zmq`, the endpoint and identity in its
///   environment ([`ENV_CONNECT`], [`ENV_IDENTITY`]) and a fresh per-launcher secret on an
///   inherited pipe. The ROUTER listens on `ipc://` in a private directory (mode 0700, removed at
///   shutdown), or on `tcp://` with [`bind_tcp`](Self::bind_tcp).
/// * **Remote** ([`ZmqLauncher::remote`]): the ROUTER listens on `tcp://ADDR:PORT` and every
///   launch waits for a worker to join: `python -m pypool_worker --app APP --transport zmq
///   --connect tcp://HOST:PORT --secret-file FILE`, started on any machine by hand or by a
///   process manager. The pool's `size` counts them; waiting is not a failure
///   ([`launch_timeout`](Launcher::launch_timeout) is unbounded), so `Pool::start` waits for
///   `min_ready` joins up to its `start_timeout`. A remote worker has no process handle: the
///   pool's PING/PONG decides that it is gone, and a worker that comes back is a new worker.
///
/// Every connection must JOIN and answer an HMAC CHALLENGE within the
/// [auth timeout](Self::auth_timeout) before anything else; on `tcp://` every later message in
/// both directions is signed (HMAC-SHA256) with a per-connection sequence number, so forged,
/// altered and replayed messages are refused and their sender dropped. Traffic is signed, not
/// encrypted: run remote pools on a private network or through a tunnel.
///
/// # Example
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use pool_core::{Pool, PoolConfig};
/// use transport_zmq::{Key, ZmqLauncher};
///
/// // Workers on other machines join with the same secret file.
/// let launcher = ZmqLauncher::remote("0.0.0.0:5555", Key::from_file("/etc/pypool/secret")?);
/// let pool = Pool::start(PoolConfig::new("handlers").size(8), Arc::new(launcher)).await?;
/// let reply = pool.call("predict", serde_json::json!({"x": [1, 2, 3]})).await?;
/// # drop(reply);
/// pool.shutdown(std::time::Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
pub struct ZmqLauncher {
    #[cfg(unix)]
    processes: pool_process::ProcessLauncher,
    bind: BindAt,
    remote: bool,
    key: Key,
    auth_timeout: Duration,
    connect_timeout: Duration,
    handshake_timeout: Option<Duration>,
    lobby: usize,
    max_frame: usize,
    bound: tokio::sync::Mutex<Option<Arc<Bound>>>,
    endpoint: Mutex<Option<String>>,
}

/// A bound ROUTER with its hub (and, on tcp, the guard that owns the public port).
struct Bound {
    hub: Hub,
    endpoint: String,
    place: Option<Place>,
    guard: Option<Guard>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(guard) = &self.guard {
            guard.close();
        }
        self.hub.close();
        if let Some(place) = &self.place {
            place.remove();
        }
    }
}

impl std::fmt::Debug for ZmqLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqLauncher")
            .field("bind", &self.bind)
            .field("remote", &self.remote)
            .field("endpoint", &self.endpoint())
            .finish_non_exhaustive()
    }
}

impl Default for ZmqLauncher {
    fn default() -> Self {
        ZmqLauncher::new()
    }
}

impl ZmqLauncher {
    /// A launcher that spawns local workers over `ipc://` with a fresh secret. It binds on first
    /// use (or [`bind`](Self::bind)), so it can be created outside a tokio runtime.
    pub fn new() -> Self {
        ZmqLauncher {
            #[cfg(unix)]
            processes: pool_process::ProcessLauncher::new(),
            bind: BindAt::Ipc(None),
            remote: false,
            key: Key::generate(),
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: None,
            lobby: DEFAULT_LOBBY,
            max_frame: pool_core::protocol::DEFAULT_MAX_FRAME,
            bound: tokio::sync::Mutex::new(None),
            endpoint: Mutex::new(None),
        }
    }

    /// A launcher whose workers join from anywhere: it listens on `tcp://addr` (`HOST:PORT`,
    /// port 0 for any free port) and accepts workers that know `key`.
    pub fn remote(addr: impl Into<String>, key: Key) -> Self {
        ZmqLauncher {
            bind: BindAt::Tcp(strip_scheme(addr.into())),
            remote: true,
            key,
            ..ZmqLauncher::new()
        }
    }

    /// Local workers connect over `tcp://addr` instead of `ipc://` (every message then signed,
    /// as for remote workers). Use a loopback address unless the network is private.
    pub fn bind_tcp(mut self, addr: impl Into<String>) -> Self {
        self.bind = BindAt::Tcp(strip_scheme(addr.into()));
        self
    }

    /// Creates the private `ipc://` socket directory under `dir` instead of `$XDG_RUNTIME_DIR`
    /// or the temporary directory.
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bind = BindAt::Ipc(Some(dir.into()));
        self
    }

    /// Sets the secret (a local launcher makes a fresh one by default).
    pub fn key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// How long a connection has to JOIN and authenticate (default [`DEFAULT_AUTH_TIMEOUT`]).
    pub fn auth_timeout(mut self, timeout: Duration) -> Self {
        self.auth_timeout = timeout;
        self
    }

    /// How long a local launch waits for its worker to join (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]); it covers the interpreter's start, not the app's import.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a worker may take, once joined, to import its app and say HELLO, if not the
    /// pool's `handshake_timeout` (remote workers whose apps load slowly).
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = Some(timeout);
        self
    }

    /// Remote: how many authenticated workers may wait while no launch wants one (default
    /// [`DEFAULT_LOBBY`]); past that, joining workers are refused.
    pub fn lobby(mut self, capacity: usize) -> Self {
        self.lobby = capacity;
        self
    }

    /// On `tcp://`: the largest message a worker may send (default 256 MiB, the pool's default
    /// `max_frame`). Keep it at least the pool's `max_frame`; larger messages end the
    /// connection before the pool reserves memory for them.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Starts local workers with this process launcher instead of a default one.
    #[cfg(unix)]
    pub fn process_launcher(mut self, launcher: pool_process::ProcessLauncher) -> Self {
        self.processes = launcher;
        self
    }

    /// Whether launches wait for remote workers to join (rather than spawning local ones).
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// Binds now, if not bound yet, and returns the endpoint workers connect to (`ipc://PATH`,
    /// or `tcp://HOST:PORT` with the port resolved). Must be called within a tokio runtime.
    pub async fn bind(&self) -> Result<String, LaunchError> {
        Ok(self.bound().await?.endpoint.clone())
    }

    /// The endpoint while bound; `None` before the first launch and after shutdown.
    pub fn endpoint(&self) -> Option<String> {
        self.endpoint.lock().clone()
    }

    /// Remote: how many authenticated workers wait for a launch to take them.
    pub fn waiting_workers(&self) -> usize {
        match self.bound.try_lock() {
            Ok(bound) => bound.as_ref().map_or(0, |b| b.hub.lobby_len()),
            Err(_) => 0,
        }
    }

    async fn bound(&self) -> Result<Arc<Bound>, LaunchError> {
        let mut slot = self.bound.lock().await;
        if let Some(bound) = slot.as_ref().filter(|b| b.hub.is_usable()) {
            return Ok(Arc::clone(bound));
        }
        slot.take();
        let bound = Arc::new(self.bind_now().await?);
        *self.endpoint.lock() = Some(bound.endpoint.clone());
        *slot = Some(Arc::clone(&bound));
        Ok(bound)
    }

    async fn bind_now(&self) -> Result<Bound, LaunchError> {
        let fail = |err: &dyn std::fmt::Display| {
            LaunchError::new(format!("zmq transport cannot listen: {err}"))
        };
        let mut socket = RouterSocket::new();
        let monitor = socket.monitor();
        let backend = socket.backend();
        // The ROUTER itself always listens on a Unix socket in a private directory; on tcp the
        // public port belongs to the guard, which relays to it (see `guard`).
        #[cfg(unix)]
        let (listener, place) = {
            let dir = match &self.bind {
                BindAt::Ipc(dir) => dir.as_deref(),
                BindAt::Tcp(_) => None,
            };
            Place::create(dir).map_err(|e| fail(&e))?
        };
        if let Err(err) = socket.bind_listener(listener).await {
            place.remove();
            return Err(fail(&err));
        }
        let (endpoint, public) = match &self.bind {
            BindAt::Ipc(_) => (format!("ipc://{}", place.socket.display()), None),
            BindAt::Tcp(addr) => {
                let listener = match tokio::net::TcpListener::bind(addr.as_str()).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        place.remove();
                        return Err(fail(&format!("cannot listen on tcp://{addr}: {err}")));
                    }
                };
                let local = listener.local_addr().map_err(|e| fail(&e))?;
                (format!("tcp://{local}"), Some(listener))
            }
        };
        let signed = public.is_some();
        let (send, recv) = socket.split();
        let hub = Hub::start(
            HubConfig {
                key: self.key.clone(),
                signed,
                remote: self.remote,
                auth_timeout: self.auth_timeout,
                lobby: self.lobby,
                label: endpoint.clone(),
            },
            send,
            recv,
            backend,
            monitor,
        );
        let guard = public.map(|listener| {
            Guard::start(
                listener,
                place.socket.clone(),
                GuardConfig {
                    max_message: (self.max_frame as u64).saturating_add(64 * 1024),
                    auth_timeout: self.auth_timeout,
                    label: endpoint.clone(),
                },
                hub.verdicts(),
            )
        });
        tracing::debug!(target: "pypool::zmq", endpoint = %endpoint, remote = self.remote, "listening");
        Ok(Bound {
            hub,
            endpoint,
            place: Some(place),
            guard,
        })
    }

    async fn join(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        let bound = self.bound().await?;
        match bound.hub.next_joined().await {
            Some(link) => {
                tracing::info!(target: "pypool::zmq", pool = %spec.pool, worker = %spec.worker_id, peer = %show(link.identity()), "a remote worker joined");
                Ok(Launched {
                    channel: link.into_channel(spec.max_frame, None),
                    process: None,
                })
            }
            None => Err(LaunchError::new(format!(
                "worker {} of pool {}: the zmq launcher shut down before a worker joined",
                spec.worker_id, spec.pool
            ))),
        }
    }
}

fn strip_scheme(addr: String) -> String {
    match addr.strip_prefix("tcp://") {
        Some(rest) => rest.to_owned(),
        None => addr,
    }
}

#[async_trait]
impl Launcher for ZmqLauncher {
    fn name(&self) -> &str {
        "zmq"
    }

    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        if self.remote {
            return self.join(spec).await;
        }
        #[cfg(unix)]
        {
            let (channel, process) = self.launch_process(spec).await?;
            Ok(Launched {
                channel,
                process: Some(Box::new(process)),
            })
        }
        #[cfg(not(unix))]
        {
            Err(LaunchError::new(
                "the zmq transport starts local workers on Unix only; use remote workers",
            ))
        }
    }

    async fn shutdown(&self) {
        let bound = self.bound.lock().await.take();
        *self.endpoint.lock() = None;
        if let Some(bound) = bound {
            if let Some(guard) = &bound.guard {
                guard.shut_down().await;
            }
            bound.hub.close();
            bound.hub.stopped().await;
            if let Some(place) = &bound.place {
                place.remove();
            }
        }
    }

    fn handshake_timeout(&self) -> Option<Duration> {
        self.handshake_timeout
    }

    fn launch_timeout(&self) -> Option<Duration> {
        // A remote launch waits for a peer to join: waiting is not failing.
        self.remote.then_some(Duration::MAX)
    }
}

#[cfg(unix)]
impl ZmqLauncher {
    /// Like [`Launcher::launch`] for a local launcher, but returns the concrete
    /// [`WorkerProcess`](pool_process::WorkerProcess). The channel is authenticated; the
    /// HELLO/WELCOME handshake is the caller's job.
    pub async fn launch_process(
        &self,
        spec: &WorkerSpec,
    ) -> Result<(pool_core::Channel, pool_process::WorkerProcess), LaunchError> {
        use pool_core::ProcessHandle;
        use pool_process::SpawnOptions;

        let bound = self.bound().await?;
        let identity_text = format!(
            "{}/{}",
            spec.worker_id,
            hex::encode(rand::random::<[u8; 8]>())
        );
        let identity = PeerIdentity::try_from(identity_text.as_bytes())
            .map_err(|err| LaunchError::new(format!("bad worker identity: {err}")))?;
        // Registered before the spawn: the worker may join before `spawn` returns.
        let mut expected = bound.hub.expect(identity);
        let options = SpawnOptions::new("zmq")
            .env(ENV_CONNECT, bound.endpoint.clone())
            .env(ENV_IDENTITY, identity_text)
            .secret(self.key.to_hex());
        let process = self.processes.spawn(spec, &options).await?.process;
        let who = format!("worker {} of pool {}", spec.worker_id, spec.pool);
        let exited = process.exited();
        tokio::pin!(exited);
        let outcome = tokio::select! {
            biased;
            link = expected.link() => link,
            info = &mut exited => {
                // It may have joined just before it exited (to report a STARTUP_ERROR, say):
                // the router may still be delivering it.
                match tokio::time::timeout(EXIT_GRACE, expected.link()).await {
                    Ok(link) => link,
                    Err(_) => {
                        let tail = process.stderr_tail();
                        let hint = if tail.iter().any(|l| l.contains("No module named 'zmq'")) {
                            format!(
                                ": its interpreter has no pyzmq (install it with `{} -m pip \
                                 install pyzmq`, or choose another interpreter)",
                                spec.python.display()
                            )
                        } else {
                            String::new()
                        };
                        return Err(LaunchError::new(format!(
                            "{who} exited ({info}) before joining {}{hint}",
                            bound.endpoint
                        ))
                        .with_stderr(tail));
                    }
                }
            }
            _ = tokio::time::sleep(self.connect_timeout) => {
                return Err(fail(process, format!(
                    "{who} did not join {} within {:?}", bound.endpoint, self.connect_timeout
                )).await);
            }
        };
        match outcome {
            Ok(link) => {
                let channel = link.into_channel(spec.max_frame, Some(Box::pin(process.exited())));
                Ok((channel, process))
            }
            Err(Some(reason)) => Err(fail(process, format!("{who}: {reason}")).await),
            Err(None) => Err(fail(
                process,
                format!("{who}: the zmq launcher shut down before the worker joined"),
            )
            .await),
        }
    }
}

/// Kills a worker whose launch failed and returns the error with its last stderr lines.
#[cfg(unix)]
async fn fail(process: pool_process::WorkerProcess, message: String) -> LaunchError {
    use pool_core::ProcessHandle;
    process.kill();
    let _ = process.wait().await;
    LaunchError::new(message).with_stderr(process.stderr_tail())
}
