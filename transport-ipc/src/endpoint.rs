//! The pool's listening socket: where it lives, the accept loop, authentication of every
//! connection, and pairing an authenticated connection with the launch that is waiting for it.
//!
//! Pairing is by process id. A launch registers the pid of the worker it started
//! ([`Endpoint::expect`]) before the worker is handed its secret, and the worker cannot connect
//! before it has its secret; so a connection's pid (from the kernel, `SO_PEERCRED`) is either a
//! registered launch or a stranger. Strangers are closed at once, before any challenge: they
//! cost an accept and a close, never a descriptor held for the auth timeout, so a flood of them
//! cannot exhaust the pool's descriptors or delay a worker's connection.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::tokio::{Listener, Stream};
use parking_lot::Mutex;
use pool_core::protocol::auth::{self, Secret};
use pool_core::Channel;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stream::SharedStream;

/// How long the accept loop pauses after a failed accept (a full descriptor table, say), so that
/// a persistent error does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// At most one log line per this interval about rejected strangers (with the count).
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The outcome of a connection, as the waiting launch receives it.
pub(crate) type Delivery = Result<Channel, String>;

/// A bound listener with its accept loop, its secret and its pending launches.
pub(crate) struct Endpoint {
    shared: Arc<Shared>,
    place: Place,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

/// What the accept loop and the connection tasks share with the launches.
struct Shared {
    secret: Secret,
    auth_timeout: Duration,
    /// Where we listen, for log messages.
    label: String,
    pairing: Mutex<Pairing>,
    stop: CancellationToken,
    /// The connection tasks, so that shutting down can wait for them.
    connections: TaskTracker,
    /// Strangers turned away, logged at most once per [`REJECTION_LOG_INTERVAL`].
    rejections: Mutex<Rejections>,
}

#[derive(Default)]
struct Pairing {
    /// Launched workers waiting for their connection, by pid.
    waiting: HashMap<u32, Waiting>,
    /// Set once the endpoint is closed: nothing is registered any more.
    closed: bool,
}

struct Waiting {
    max_frame: usize,
    /// A connection from this pid has been accepted and is being authenticated.
    connected: bool,
    tx: Option<oneshot::Sender<Delivery>>,
}

/// Rejected strangers since the last log line. A flood must not become a flood of log lines.
#[derive(Default)]
struct Rejections {
    last_logged: Option<Instant>,
    unlogged: u64,
}

/// Where the socket lives on this platform.
struct Place {
    /// The value workers get in `PYPOOL_IPC_PATH`: the socket's path (Unix) or the pipe's name
    /// (Windows).
    address: PathBuf,
    /// The private directory that holds the socket (Unix), removed with it.
    dir: Option<PathBuf>,
}

/// Settings for [`Endpoint::bind`].
pub(crate) struct BindOptions<'a> {
    pub(crate) socket_dir: Option<&'a Path>,
    pub(crate) auth_timeout: Duration,
}

impl Endpoint {
    /// Binds a fresh listener with a fresh secret and starts its accept loop on the current tokio
    /// runtime.
    pub(crate) fn bind(options: &BindOptions<'_>) -> io::Result<Arc<Endpoint>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("the ipc launcher must be used from within a tokio runtime")
        })?;
        let (listener, place) = platform::listen(options.socket_dir)?;
        let shared = Arc::new(Shared {
            secret: Secret::generate(),
            auth_timeout: options.auth_timeout,
            label: place.address.display().to_string(),
            pairing: Mutex::new(Pairing::default()),
            stop: CancellationToken::new(),
            connections: TaskTracker::new(),
            rejections: Mutex::new(Rejections::default()),
        });
        let accept_task = runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        tracing::debug!(target: "pypool::ipc", socket = %shared.label, "listening");
        Ok(Arc::new(Endpoint {
            shared,
            place,
            accept_task: Mutex::new(Some(accept_task)),
        }))
    }

    /// The value of `PYPOOL_IPC_PATH` for workers.
    pub(crate) fn address(&self) -> &Path {
        &self.place.address
    }

    /// The hex secret for `PYPOOL_SECRET`.
    pub(crate) fn secret_hex(&self) -> String {
        self.shared.secret.to_hex()
    }

    /// Whether the endpoint still accepts connections (not closed, accept loop alive; the loop
    /// dies with the runtime it was started on).
    pub(crate) fn is_usable(&self) -> bool {
        if self.shared.stop.is_cancelled() {
            return false;
        }
        match &*self.accept_task.lock() {
            Some(task) => !task.is_finished(),
            None => false,
        }
    }

    /// Registers a launched worker's pid; the returned handle receives its connection. Call it
    /// before the worker can connect (before it has its secret): until then its connections are
    /// strangers'.
    pub(crate) fn expect(self: &Arc<Self>, pid: u32, max_frame: usize) -> Expected {
        let (tx, rx) = oneshot::channel();
        let mut pairing = self.shared.pairing.lock();
        if !pairing.closed {
            pairing.waiting.insert(
                pid,
                Waiting {
                    max_frame,
                    connected: false,
                    tx: Some(tx),
                },
            );
        }
        // When closed, `tx` is dropped here and the launch sees the endpoint gone at once.
        drop(pairing);
        Expected {
            shared: Arc::clone(&self.shared),
            pid,
            rx,
        }
    }

    /// Stops accepting, fails every waiting launch, and removes the socket and its directory.
    /// Synchronous and idempotent (called from `Drop`).
    pub(crate) fn close(&self) {
        self.shared.stop.cancel();
        if let Some(task) = &*self.accept_task.lock() {
            task.abort();
        }
        let waiting = {
            let mut pairing = self.shared.pairing.lock();
            pairing.closed = true;
            std::mem::take(&mut pairing.waiting)
        };
        // Dropping the senders tells every waiting launch that the endpoint is gone.
        drop(waiting);
        platform::remove(&self.place);
    }

    /// [`close`](Self::close), then waits until the accept loop and every connection task have
    /// ended, so that the listening socket and every unpaired connection are closed when this
    /// returns.
    pub(crate) async fn shut_down(&self) {
        self.close();
        let task = self.accept_task.lock().take();
        if let Some(task) = task {
            // Cancelled or aborted: either way it has ended once this returns.
            let _ = task.await;
        }
        // The accept loop has ended, so no connection task can be added any more.
        self.shared.connections.close();
        self.shared.connections.wait().await;
        tracing::debug!(target: "pypool::ipc", socket = %self.shared.label, "closed");
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.close();
    }
}

/// A launch's claim on the connection from its worker's pid; unregisters on drop.
pub(crate) struct Expected {
    shared: Arc<Shared>,
    pid: u32,
    rx: oneshot::Receiver<Delivery>,
}

impl Expected {
    /// The connection, or why there is none. `Err` with `None` when the endpoint was closed.
    pub(crate) async fn connection(&mut self) -> Result<Channel, Option<String>> {
        match (&mut self.rx).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(reason)) => Err(Some(reason)),
            Err(_) => Err(None),
        }
    }

    /// Whether a connection from the worker has been accepted and is being authenticated.
    pub(crate) fn connected(&self) -> bool {
        self.shared
            .pairing
            .lock()
            .waiting
            .get(&self.pid)
            .is_some_and(|waiting| waiting.connected)
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.shared.pairing.lock().waiting.remove(&self.pid);
    }
}

impl Shared {
    /// The frame limit for a connection from `pid` when `pid` is a worker being launched (marking
    /// it connected); `None` for a stranger.
    fn claim(&self, pid: Option<u32>) -> Option<usize> {
        let pid = pid?;
        let mut pairing = self.pairing.lock();
        let waiting = pairing.waiting.get_mut(&pid)?;
        waiting.connected = true;
        Some(waiting.max_frame)
    }

    /// Hands an outcome to the launch waiting for `pid`. Returns the delivery back when no
    /// launch takes it.
    fn deliver(&self, pid: u32, delivery: Delivery) -> Result<(), Delivery> {
        let tx = self
            .pairing
            .lock()
            .waiting
            .get_mut(&pid)
            .and_then(|waiting| waiting.tx.take());
        match tx {
            Some(tx) => tx.send(delivery),
            None => Err(delivery),
        }
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(stream) => {
                // A stranger is turned away right here: it costs an accept and a close, never a
                // task or a descriptor kept for longer, however many of them come.
                let Some((pid, max_frame)) = admit(&stream, &shared) else {
                    continue;
                };
                // A launched worker is authenticated in its own task: a slow one holds up
                // nobody else.
                let task_shared = Arc::clone(&shared);
                shared.connections.spawn(async move {
                    let shared = task_shared;
                    tokio::select! {
                        _ = shared.stop.cancelled() => {}
                        _ = authenticate(stream, pid, max_frame, &shared) => {}
                    }
                });
            }
            Err(err) => {
                tracing::warn!(
                    target: "pypool::ipc",
                    socket = %shared.label,
                    error = %err,
                    "accepting a connection failed"
                );
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

/// The pid and frame limit of a connection from a worker being launched; `None` (the connection
/// is then dropped, which closes it) for anyone else.
fn admit(stream: &Stream, shared: &Shared) -> Option<(u32, usize)> {
    let pid = match peer_pid(stream) {
        Ok(pid) => pid,
        Err(reason) => {
            reject_stranger(shared, None, &reason);
            return None;
        }
    };
    match shared.claim(pid) {
        Some(max_frame) => pid.map(|pid| (pid, max_frame)),
        None => {
            reject_stranger(shared, pid, "not a process this pool is launching");
            None
        }
    }
}

/// Authenticates a launched worker's connection and hands it to its launch.
async fn authenticate(stream: Stream, pid: u32, max_frame: usize, shared: &Shared) {
    let mut channel = SharedStream::new(stream).into_channel(max_frame);
    if let Err(err) = auth::challenge(&mut channel, &shared.secret, shared.auth_timeout).await {
        let reason = format!("authentication failed: {err}");
        tracing::warn!(
            target: "pypool::ipc",
            socket = %shared.label,
            peer_pid = pid,
            "rejected a worker's connection: {reason}"
        );
        // A worker we launched that cannot authenticate will not do better later: fail its
        // launch now rather than at its connect timeout.
        let _ = shared.deliver(pid, Err(reason));
        return;
    }
    if shared.deliver(pid, Ok(channel)).is_err() {
        // Its launch gave up (timed out, or the pool is stopping) while it authenticated.
        tracing::debug!(
            target: "pypool::ipc",
            socket = %shared.label,
            peer_pid = pid,
            "closed an authenticated connection nobody waits for any more"
        );
    }
}

/// Logs a turned-away stranger: the first at once, then at most one line (with a count) per
/// [`REJECTION_LOG_INTERVAL`].
fn reject_stranger(shared: &Shared, pid: Option<u32>, reason: &str) {
    let now = Instant::now();
    let mut rejections = shared.rejections.lock();
    let due = rejections
        .last_logged
        .is_none_or(|last| now.duration_since(last) >= REJECTION_LOG_INTERVAL);
    if !due {
        rejections.unlogged += 1;
        return;
    }
    let earlier = std::mem::take(&mut rejections.unlogged);
    rejections.last_logged = Some(now);
    drop(rejections);
    tracing::warn!(
        target: "pypool::ipc",
        socket = %shared.label,
        peer_pid = ?pid,
        rejected_since_last_report = earlier,
        "rejected a connection: {reason}"
    );
}

/// The peer's pid from the kernel, after checking that it runs as our user (Unix).
fn peer_pid(stream: &Stream) -> Result<Option<u32>, String> {
    let creds = stream
        .peer_creds()
        .map_err(|err| format!("cannot read the peer's credentials: {err}"))?;
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let ours = unsafe { libc::geteuid() };
        match creds.euid() {
            Some(uid) if uid == ours => {}
            Some(uid) => return Err(format!("the peer runs as uid {uid}, not as us ({ours})")),
            None => return Err("the peer's uid is unknown".to_owned()),
        }
    }
    Ok(creds.pid().and_then(|pid| u32::try_from(pid).ok()))
}

#[cfg(unix)]
mod platform {
    //! A Unix domain socket `pool.sock`, mode 0600, in a fresh private directory (mode 0700)
    //! named after our pid and 64 random bits.

    use std::fs;
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use interprocess::local_socket::tokio::Listener;
    use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
    use interprocess::os::unix::local_socket::ListenerOptionsExt;

    use super::Place;

    /// The socket's file name inside its private directory.
    const SOCKET_NAME: &str = "pool.sock";

    /// The private directory's name: this prefix, the owner's pid, `-`, 16 hex digits.
    const DIR_PREFIX: &str = "pypool-ipc-";

    /// Removes the socket directories that runs of this user which died without cleaning up
    /// (SIGKILLed, say) left in `base`. A directory goes only if everything says it is stale:
    /// its name is ours (`pypool-ipc-<pid>-<16 hex digits>`), it is a real directory owned by
    /// our uid, its owner pid is not a live process, it holds nothing but `pool.sock`, and
    /// nothing listens on that socket any more (a pool in another pid namespace sharing this
    /// directory would still answer). Errors only leave a directory where it is.
    fn sweep_stale(base: &Path) {
        use std::os::unix::fs::MetadataExt;

        let Ok(entries) = fs::read_dir(base) else {
            return;
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(stale_owner) else {
                continue;
            };
            if owner == std::process::id() || process_alive(owner) {
                continue;
            }
            let dir = entry.path();
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() && meta.uid() == uid => {}
                _ => continue,
            }
            let Ok(inside) = fs::read_dir(&dir) else {
                continue;
            };
            if inside
                .map(|entry| entry.map(|entry| entry.file_name()))
                .any(|name| name.map_or(true, |name| name != SOCKET_NAME))
            {
                continue;
            }
            let socket = dir.join(SOCKET_NAME);
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                continue;
            }
            let _ = fs::remove_file(&socket);
            if fs::remove_dir(&dir).is_ok() {
                tracing::info!(
                    target: "pypool::ipc",
                    path = %dir.display(),
                    owner_pid = owner,
                    "removed the socket directory of a pool that died without cleaning up"
                );
            }
        }
    }

    /// The owner pid in a directory name `pypool-ipc-<pid>-<16 hex digits>`.
    fn stale_owner(name: &str) -> Option<u32> {
        let (pid, random) = name.strip_prefix(DIR_PREFIX)?.split_once('-')?;
        let hex = random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| pid.parse().ok()).flatten()
    }

    /// Whether a process with this pid exists (possibly another user's).
    fn process_alive(pid: u32) -> bool {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// The longest path a Unix socket address holds (`sun_path` is 108 bytes on Linux, 104 on
    /// the BSDs and macOS, including the terminating NUL).
    const MAX_SOCKET_PATH: usize = 103;

    /// Where the private directory may go, best first: `$XDG_RUNTIME_DIR` (per-user, never
    /// shared), the temporary directory, and `/tmp` for a `$TMPDIR` too long for a socket path.
    fn bases(configured: Option<&Path>) -> Vec<PathBuf> {
        if let Some(dir) = configured {
            // Workers may run in another working directory: give them an absolute path.
            return vec![std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())];
        }
        let mut bases = Vec::new();
        if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
            let runtime = PathBuf::from(runtime);
            if runtime.is_absolute() && runtime.is_dir() {
                bases.push(runtime);
            }
        }
        for dir in [std::env::temp_dir(), PathBuf::from("/tmp")] {
            if !bases.contains(&dir) {
                bases.push(dir);
            }
        }
        bases
    }

    pub(super) fn listen(configured: Option<&Path>) -> io::Result<(Listener, Place)> {
        let mut last_err = None;
        for base in bases(configured) {
            match listen_in(&base) {
                Ok(bound) => return Ok(bound),
                Err(err) => {
                    tracing::debug!(
                        target: "pypool::ipc",
                        base = %base.display(),
                        error = %err,
                        "cannot listen here"
                    );
                    last_err = Some(io::Error::new(
                        err.kind(),
                        format!("cannot create a socket in {}: {err}", base.display()),
                    ));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no directory for the ipc socket")))
    }

    fn listen_in(base: &Path) -> io::Result<(Listener, Place)> {
        sweep_stale(base);
        let dir = base.join(format!(
            "{DIR_PREFIX}{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let socket = dir.join(SOCKET_NAME);
        if socket.as_os_str().as_bytes().len() > MAX_SOCKET_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the socket path {} is longer than a socket address allows",
                    socket.display()
                ),
            ));
        }
        // `create`, not `create_all`: the name is fresh, and an existing directory of that name
        // is not ours to use.
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let place = Place {
            address: socket,
            dir: Some(dir),
        };
        // Past this point `place` is removed again on every error.
        match bind(&place) {
            Ok(listener) => Ok((listener, place)),
            Err(err) => {
                remove(&place);
                Err(err)
            }
        }
    }

    fn bind(place: &Place) -> io::Result<Listener> {
        let (Some(dir), socket) = (&place.dir, &place.address) else {
            return Err(io::Error::other("no socket directory"));
        };
        // The umask may have narrowed the mode; it cannot have widened it. Make it exact.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        // A stale socket file (a crashed run that reused this name) would make bind fail.
        match fs::remove_file(socket) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let name = socket.as_path().to_fs_name::<GenericFilePath>()?;
        ListenerOptions::new()
            .name(name)
            // Set on the socket before bind, so the file never exists with wider permissions.
            .mode(0o600)
            // We remove the file ourselves, synchronously, in `remove`.
            .reclaim_name(false)
            .create_tokio()
    }

    /// Removes the socket file and its directory. Errors other than "already gone" are logged.
    pub(super) fn remove(place: &Place) {
        let mut removals = vec![(&place.address, fs::remove_file(&place.address))];
        if let Some(dir) = &place.dir {
            removals.push((dir, fs::remove_dir(dir)));
        }
        for (path, result) in removals {
            if let Err(err) = result {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(
                        target: "pypool::ipc",
                        path = %path.display(),
                        error = %err,
                        "cannot remove the ipc socket"
                    );
                }
            }
        }
    }
}

#[cfg(windows)]
mod platform {
    //! A named pipe `\\.\pipe\pypool-<pid>-<random>`. Untested: the launcher cannot start
    //! workers on Windows yet (see the crate documentation).

    use std::io;
    use std::path::{Path, PathBuf};

    use interprocess::local_socket::tokio::Listener;
    use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};

    use super::Place;

    pub(super) fn listen(_configured: Option<&Path>) -> io::Result<(Listener, Place)> {
        let name = format!(
            "pypool-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let listener = ListenerOptions::new()
            .name(name.as_str().to_ns_name::<GenericNamespaced>()?)
            .create_tokio()?;
        let place = Place {
            address: PathBuf::from(format!(r"\\.\pipe\{name}")),
            dir: None,
        };
        Ok((listener, place))
    }

    /// A named pipe disappears when its last handle closes: nothing to remove.
    pub(super) fn remove(_place: &Place) {}
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use pool_core::protocol::{channel_from_io, decode, encode, Codec, Message};
    use tokio::net::UnixStream;

    use super::*;

    /// Bound for every step, so that a bug fails the test instead of hanging it.
    const STEP: Duration = Duration::from_secs(30);

    fn bind(dir: &Path, auth_timeout: Duration) -> Arc<Endpoint> {
        Endpoint::bind(&BindOptions {
            socket_dir: Some(dir),
            auth_timeout,
        })
        .expect("bind")
    }

    /// A client in this process: connects, reads the CHALLENGE and answers it with the HMAC
    /// under `key`. Returns the channel for more frames.
    async fn answer_challenge(address: &Path, key: &[u8]) -> Channel {
        let stream = UnixStream::connect(address).await.expect("connect");
        let (read, write) = stream.into_split();
        let mut channel = channel_from_io(read, write, 1 << 20);
        let frame = tokio::time::timeout(STEP, channel.receiver.recv())
            .await
            .expect("no challenge in time")
            .expect("read")
            .expect("a challenge, not end of stream");
        let Ok((Message::Challenge { nonce }, _)) = decode(frame) else {
            panic!("expected CHALLENGE");
        };
        let answer = Message::Auth {
            mac: auth::mac(key, &nonce),
        };
        let body = encode(&answer, Codec::Json, &[]).expect("encode");
        channel.sender.send(body).await.expect("send AUTH");
        channel
    }

    async fn assert_closed(channel: &mut Channel) {
        let next = tokio::time::timeout(STEP, channel.receiver.recv())
            .await
            .expect("the pool did not close the connection");
        assert!(
            matches!(next, Ok(None)),
            "expected end of stream, got {next:?}"
        );
    }

    #[tokio::test]
    async fn a_launched_pid_is_paired_after_auth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = bind(dir.path(), STEP);
        // This test process stands in for the launched worker.
        let mut expected = endpoint.expect(std::process::id(), 1 << 20);
        let key = endpoint.shared.secret.as_bytes().to_vec();
        let address = endpoint.address().to_path_buf();
        let client = tokio::spawn(async move {
            let mut channel = answer_challenge(&address, &key).await;
            channel
                .sender
                .send(Bytes::from_static(b"after auth"))
                .await
                .expect("send");
            channel
        });
        let mut channel = tokio::time::timeout(STEP, expected.connection())
            .await
            .expect("no connection in time")
            .expect("the connection is paired");
        let frame = channel.receiver.recv().await.expect("read");
        assert_eq!(frame, Some(Bytes::from_static(b"after auth")));
        drop(client.await.expect("client"));
        endpoint.shut_down().await;
    }

    #[tokio::test]
    async fn a_stranger_is_closed_before_any_challenge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = bind(dir.path(), STEP);
        // Nobody is launching this process: it gets no challenge to answer, only the close.
        let stream = UnixStream::connect(endpoint.address())
            .await
            .expect("connect");
        let (read, write) = stream.into_split();
        let mut channel = channel_from_io(read, write, 1 << 20);
        assert_closed(&mut channel).await;
        endpoint.shut_down().await;
    }

    #[tokio::test]
    async fn a_launched_pid_with_a_wrong_mac_fails_its_launch_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = bind(dir.path(), STEP);
        let mut expected = endpoint.expect(std::process::id(), 1 << 20);
        let mut channel = answer_challenge(endpoint.address(), b"not the secret").await;
        let outcome = tokio::time::timeout(STEP, expected.connection())
            .await
            .expect("no outcome in time");
        match outcome {
            Err(Some(reason)) => assert!(reason.contains("wrong HMAC"), "{reason}"),
            Err(None) => panic!("expected an authentication failure, got a closed endpoint"),
            Ok(_) => panic!("a wrong MAC was accepted"),
        }
        assert_closed(&mut channel).await;
        endpoint.shut_down().await;
    }

    #[tokio::test]
    async fn closing_fails_waiting_launches_and_removes_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = bind(dir.path(), STEP);
        let address = endpoint.address().to_path_buf();
        let socket_dir = address.parent().expect("a directory").to_path_buf();
        assert!(address.exists());
        let mut expected = endpoint.expect(std::process::id(), 1 << 20);
        endpoint.shut_down().await;
        assert!(matches!(expected.connection().await, Err(None)));
        assert!(!address.exists());
        assert!(!socket_dir.exists());
        assert!(!endpoint.is_usable());
        // Registering after the close fails at once too.
        let mut late = endpoint.expect(1, 1 << 20);
        assert!(matches!(late.connection().await, Err(None)));
    }
}
