//! The pool's ROUTER socket: one task that reads every message, lets strangers join only through
//! JOIN / CHALLENGE / AUTH, checks the signatures of authenticated peers, and routes their
//! messages to the [`Link`] of each worker.
//!
//! Who may get a link:
//! * **local** hubs pair an authenticated peer by its routing identity with the launch that
//!   spawned it (the launch chose the identity and registered it before spawning);
//! * **remote** hubs hand authenticated peers to waiting launches in arrival order; a peer that
//!   joins while no launch waits stays in a small bounded lobby until one does (so a replacement
//!   is instant), and is refused when the lobby is full.
//!
//! Every other peer is refused: sent a `reject` with the reason where it joined at all, logged
//! (rate-limited), and disconnected. Nothing a stranger sends is kept beyond a small, bounded
//! table of connections that have not finished joining.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use pool_core::protocol::auth;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::util::PeerIdentity;
use zeromq::{
    MultiPeerBackend, RouterRecvHalf, RouterSendHalf, SocketEvent, SocketRecv, SocketSend,
    ZmqMessage,
};

use crate::key::{self, Key, Verifier, TO_POOL, TO_WORKER};
use crate::link::{Command, Inbound, Link, LinkParts};

/// Connections that have not finished joining, at most. Past this, new connections are dropped
/// at once: a flood of strangers costs a bounded table, not the pool.
pub(crate) const MAX_STRANGERS: usize = 1024;
/// Messages queued for one worker's link before the router waits for the pool to read them.
pub(crate) const INBOX_CAPACITY: usize = 16;
/// How long the router waits for the pool to make room in a link's queue before it gives up on
/// that worker (the pool reads every link continuously; a full queue that long means a worker
/// nobody reads, such as a lobby worker that floods).
const INBOX_STALL: Duration = Duration::from_secs(5);
/// How often expired joins and lingering rejections are swept.
const SWEEP: Duration = Duration::from_millis(100);
/// How long a refused peer keeps its connection after `reject` was queued, so the reason
/// reaches it before the disconnect.
const REJECT_LINGER: Duration = Duration::from_millis(200);
/// Rejections logged at `warn` per second; the rest are counted and summarised.
const LOGS_PER_SECOND: u32 = 20;
/// The JOIN message's `transport` version this hub speaks.
const TRANSPORT_VERSION: u64 = 1;
/// The largest JOIN or AUTH body accepted (they are about a hundred bytes).
const CONTROL_MAX: usize = 4096;

/// What a local launch receives: the link, or why its worker was refused.
pub(crate) type Delivery = Result<Link, String>;

/// Hub settings.
pub(crate) struct HubConfig {
    pub(crate) key: Key,
    /// Sign and check every message after AUTH (tcp endpoints).
    pub(crate) signed: bool,
    /// Hand authenticated peers to waiting launches (remote) instead of pairing identities.
    pub(crate) remote: bool,
    pub(crate) auth_timeout: Duration,
    pub(crate) lobby: usize,
    /// For log messages: where the ROUTER listens.
    pub(crate) label: String,
}

/// The hub shared by the launcher and the router task.
pub(crate) struct Hub {
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    config: HubConfig,
    verdicts: Verdicts,
    pairing: Mutex<Pairing>,
    stop: CancellationToken,
    commands: mpsc::UnboundedSender<Command>,
    send: RouterSendHalf,
}

#[derive(Default)]
struct Pairing {
    /// Local: launches waiting for the peer with this identity.
    expected: HashMap<PeerIdentity, oneshot::Sender<Delivery>>,
    /// Remote: launches waiting for any peer, oldest first.
    waiting: VecDeque<oneshot::Sender<Link>>,
    /// Remote: authenticated peers no launch has taken yet, oldest first.
    lobby: VecDeque<Link>,
    closed: bool,
}

impl Hub {
    /// Starts the router task for a bound socket.
    pub(crate) fn start(
        config: HubConfig,
        send: RouterSendHalf,
        recv: RouterRecvHalf,
        backend: Arc<dyn MultiPeerBackend>,
        monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    ) -> Hub {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            config,
            verdicts: Verdicts::default(),
            pairing: Mutex::new(Pairing::default()),
            stop: CancellationToken::new(),
            commands,
            send,
        });
        let router = Router {
            shared: Arc::clone(&shared),
            recv,
            backend,
            monitor,
            commands: command_rx,
            routes: HashMap::new(),
            strangers: HashMap::new(),
            closing: VecDeque::new(),
            log: LogLimiter::default(),
        };
        let task = tokio::spawn(router.run());
        Hub {
            shared,
            task: Mutex::new(Some(task)),
        }
    }

    /// Which identities are authenticated, for the tcp guard.
    pub(crate) fn verdicts(&self) -> Verdicts {
        self.shared.verdicts.clone()
    }

    /// Waits until the router task has ended (after [`close`](Self::close)).
    pub(crate) async fn stopped(&self) {
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Whether the router task still runs (it ends with its runtime or at [`close`](Self::close)).
    pub(crate) fn is_usable(&self) -> bool {
        !self.shared.stop.is_cancelled()
            && self
                .task
                .lock()
                .as_ref()
                .is_some_and(|task| !task.is_finished())
    }

    /// Local: registers the identity a launch gave its worker; the receiver gets its link.
    pub(crate) fn expect(&self, identity: PeerIdentity) -> Expected {
        let (tx, rx) = oneshot::channel();
        let mut pairing = self.shared.pairing.lock();
        if !pairing.closed {
            pairing.expected.insert(identity.clone(), tx);
        }
        drop(pairing);
        Expected {
            shared: Arc::clone(&self.shared),
            identity,
            rx,
        }
    }

    /// Remote: the next worker that joins (or the oldest in the lobby). `None` once closed.
    pub(crate) async fn next_joined(&self) -> Option<Link> {
        let rx = {
            let mut pairing = self.shared.pairing.lock();
            if pairing.closed {
                return None;
            }
            if let Some(link) = pairing.lobby.pop_front() {
                return Some(link);
            }
            let (tx, rx) = oneshot::channel();
            pairing.waiting.push_back(tx);
            rx
        };
        rx.await.ok()
    }

    /// How many authenticated workers wait in the lobby (remote).
    pub(crate) fn lobby_len(&self) -> usize {
        self.shared.pairing.lock().lobby.len()
    }

    /// Stops the router, fails every waiting launch and drops the lobby. Idempotent.
    pub(crate) fn close(&self) {
        self.shared.stop.cancel();
        let (expected, waiting, lobby) = {
            let mut pairing = self.shared.pairing.lock();
            pairing.closed = true;
            (
                std::mem::take(&mut pairing.expected),
                std::mem::take(&mut pairing.waiting),
                std::mem::take(&mut pairing.lobby),
            )
        };
        drop((expected, waiting, lobby));
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.close();
    }
}

/// A local launch's claim on the peer with its worker's identity; unregisters on drop.
pub(crate) struct Expected {
    shared: Arc<Shared>,
    identity: PeerIdentity,
    rx: oneshot::Receiver<Delivery>,
}

impl Expected {
    /// The link, or why there is none (`None`: the hub closed).
    pub(crate) async fn link(&mut self) -> Result<Link, Option<String>> {
        match (&mut self.rx).await {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(reason)) => Err(Some(reason)),
            Err(_) => Err(None),
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.shared.pairing.lock().expected.remove(&self.identity);
    }
}

/// An authenticated peer's route: where its messages go and how they are checked.
struct Route {
    inbox: mpsc::Sender<Inbound>,
    verifier: Option<Verifier>,
}

/// A connection that has not finished joining.
enum Stranger {
    /// Connected (or sent something other than JOIN first is refused).
    Connected { deadline: Instant },
    /// Sent JOIN, was sent CHALLENGE; AUTH is due.
    Challenged {
        deadline: Instant,
        pool_nonce: String,
        worker_nonce: String,
    },
}

impl Stranger {
    fn deadline(&self) -> Instant {
        match self {
            Stranger::Connected { deadline } | Stranger::Challenged { deadline, .. } => *deadline,
        }
    }
}

struct Router {
    shared: Arc<Shared>,
    recv: RouterRecvHalf,
    backend: Arc<dyn MultiPeerBackend>,
    monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    commands: mpsc::UnboundedReceiver<Command>,
    routes: HashMap<PeerIdentity, Route>,
    strangers: HashMap<PeerIdentity, Stranger>,
    /// Refused peers and when to disconnect them (after their `reject` went out).
    closing: VecDeque<(Instant, PeerIdentity)>,
    log: LogLimiter,
}

impl Router {
    async fn run(mut self) {
        let stop = self.shared.stop.clone();
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(command) = self.commands.recv() => self.command(command),
                Some(event) = self.monitor.next() => self.event(event),
                received = self.recv.recv() => match received {
                    Ok(message) => self.message(message).await,
                    Err(err) => {
                        tracing::warn!(target: "pypool::zmq", endpoint = %self.shared.config.label, error = %err, "the ROUTER socket failed");
                        break;
                    }
                },
                _ = sweep.tick() => self.sweep(),
            }
        }
        // Ending the routes ends every link's receiver: the pool sees its workers' channels
        // close.
        self.routes.clear();
        tracing::debug!(target: "pypool::zmq", endpoint = %self.shared.config.label, "router stopped");
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Forget(identity) => {
                if self.routes.remove(&identity).is_some() {
                    self.shared.verdicts.forget(&identity);
                    self.backend.peer_disconnected(&identity);
                }
            }
        }
    }

    fn event(&mut self, event: SocketEvent) {
        match event {
            SocketEvent::Accepted(_, identity) => {
                if self.routes.contains_key(&identity) || self.strangers.contains_key(&identity) {
                    return;
                }
                if self.strangers.len() >= MAX_STRANGERS {
                    self.refuse_now(&identity, "too many connections are joining at once");
                    return;
                }
                let deadline = Instant::now() + self.shared.config.auth_timeout;
                self.strangers
                    .insert(identity, Stranger::Connected { deadline });
            }
            SocketEvent::Disconnected(identity) => {
                // Dropping the route's sender ends the link: the pool reads what was queued,
                // then end-of-stream.
                self.routes.remove(&identity);
                self.strangers.remove(&identity);
                self.shared.verdicts.forget(&identity);
                self.shared
                    .pairing
                    .lock()
                    .lobby
                    .retain(|link| link.identity() != &identity);
            }
            _ => {}
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let expired: Vec<PeerIdentity> = self
            .strangers
            .iter()
            .filter(|(_, stranger)| stranger.deadline() <= now)
            .map(|(identity, _)| identity.clone())
            .collect();
        for identity in expired {
            let timeout = self.shared.config.auth_timeout;
            self.refuse_now(
                &identity,
                &format!("did not join and authenticate within {timeout:?}"),
            );
        }
        while let Some((when, _)) = self.closing.front() {
            if *when > now {
                break;
            }
            if let Some((_, identity)) = self.closing.pop_front() {
                self.backend.peer_disconnected(&identity);
            }
        }
        self.log.flush(&self.shared.config.label);
    }

    async fn message(&mut self, message: ZmqMessage) {
        let mut frames = message.into_vecdeque();
        let Some(identity) = frames.pop_front() else {
            return;
        };
        let Ok(identity) = PeerIdentity::try_from(identity) else {
            return;
        };
        if let Some(route) = self.routes.get_mut(&identity) {
            let inbound = route_body(route, frames);
            let failed = inbound.is_err();
            let inbox = route.inbox.clone();
            if failed {
                // The link reports the reason; the peer is gone from now on.
                self.routes.remove(&identity);
                self.shared.verdicts.forget(&identity);
                self.backend.peer_disconnected(&identity);
            }
            let delivered = match inbox.try_send(inbound) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(inbound)) => {
                    matches!(
                        tokio::time::timeout(INBOX_STALL, inbox.send(inbound)).await,
                        Ok(Ok(()))
                    )
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            if !delivered && !failed {
                self.log.warn(
                    &self.shared.config.label,
                    &identity,
                    "its messages were not read: dropping it",
                );
                self.routes.remove(&identity);
                self.shared.verdicts.forget(&identity);
                self.backend.peer_disconnected(&identity);
            }
            return;
        }
        if self.closing.iter().any(|(_, id)| *id == identity) {
            return;
        }
        let control = control_message(&frames);
        match (self.strangers.remove(&identity), control) {
            (
                Some(Stranger::Challenged {
                    pool_nonce,
                    worker_nonce,
                    ..
                }),
                Some(control),
            ) if control.get("type").and_then(Value::as_str) == Some("auth") => {
                self.authenticate(identity, &control, pool_nonce, worker_nonce)
                    .await;
            }
            (None | Some(Stranger::Connected { .. }), Some(control))
                if control.get("type").and_then(Value::as_str) == Some("join") =>
            {
                self.join(identity, &control).await;
            }
            (Some(Stranger::Challenged { .. }), _) => {
                self.refuse(identity, "expected AUTH after the challenge")
                    .await;
            }
            _ => {
                self.refuse_now(&identity, "sent something other than JOIN first");
            }
        }
    }

    async fn join(&mut self, identity: PeerIdentity, join: &Value) {
        let version = join.get("transport").and_then(Value::as_u64);
        let worker_nonce = join.get("nonce").and_then(Value::as_str).unwrap_or("");
        if version != Some(TRANSPORT_VERSION) {
            self.refuse(identity, &format!("speaks zmq transport version {version:?}, this pool speaks {TRANSPORT_VERSION}")).await;
            return;
        }
        if worker_nonce.len() < 32 || worker_nonce.len() > 128 {
            self.refuse(identity, "JOIN needs a nonce of 32 to 128 characters")
                .await;
            return;
        }
        if !self.shared.config.remote
            && !self.shared.pairing.lock().expected.contains_key(&identity)
        {
            self.refuse(identity, "not a worker this pool is launching")
                .await;
            return;
        }
        if self.strangers.len() >= MAX_STRANGERS {
            self.refuse(identity, "too many connections are joining at once")
                .await;
            return;
        }
        let pool_nonce = auth::new_nonce();
        let challenge = control_body(&json!({"type": "challenge", "nonce": pool_nonce}));
        let deadline = Instant::now() + self.shared.config.auth_timeout;
        self.strangers.insert(
            identity.clone(),
            Stranger::Challenged {
                deadline,
                pool_nonce,
                worker_nonce: worker_nonce.to_owned(),
            },
        );
        self.send_raw(&identity, challenge).await;
    }

    async fn authenticate(
        &mut self,
        identity: PeerIdentity,
        answer: &Value,
        pool_nonce: String,
        worker_nonce: String,
    ) {
        let mac = answer.get("mac").and_then(Value::as_str).unwrap_or("");
        if !auth::verify(self.shared.config.key.as_bytes(), &pool_nonce, mac) {
            let reason = "wrong HMAC: the peer does not know the pool's secret";
            if let Some(tx) = self.shared.pairing.lock().expected.remove(&identity) {
                // A worker we launched that cannot authenticate will not do better later.
                let _ = tx.send(Err(format!("authentication failed: {reason}")));
            }
            self.refuse(identity, reason).await;
            return;
        }
        let signing = self
            .shared
            .config
            .signed
            .then(|| key::session_key(&self.shared.config.key, &pool_nonce, &worker_nonce));
        let (inbox, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        self.routes.insert(
            identity.clone(),
            Route {
                inbox,
                verifier: signing.as_ref().map(|k| Verifier::new(k, TO_POOL)),
            },
        );
        let link = Link::new(LinkParts {
            identity: identity.clone(),
            send: self.shared.send.clone(),
            inbox: inbox_rx,
            signing: signing.map(|k| key::Signer::new(&k, TO_WORKER)),
            commands: self.shared.commands.clone(),
        });
        if let Err(reason) = self.place(link) {
            self.routes.remove(&identity);
            self.refuse(identity, &reason).await;
            return;
        }
        self.shared.verdicts.admit(identity.clone());
        tracing::debug!(target: "pypool::zmq", endpoint = %self.shared.config.label, peer = %show(&identity), "a worker joined");
    }

    /// Hands an authenticated link to its launch (local) or the first waiting one (remote).
    fn place(&self, link: Link) -> Result<(), String> {
        let mut pairing = self.shared.pairing.lock();
        if pairing.closed {
            return Err("the pool is shutting down".into());
        }
        if !self.shared.config.remote {
            return match pairing.expected.remove(link.identity()) {
                Some(tx) => tx
                    .send(Ok(link))
                    .map_err(|_| "its launch was abandoned".to_owned()),
                None => Err("not a worker this pool is launching".into()),
            };
        }
        let mut link = link;
        while let Some(tx) = pairing.waiting.pop_front() {
            match tx.send(link) {
                Ok(()) => return Ok(()),
                // That launch was abandoned: try the next.
                Err(back) => link = back,
            }
        }
        if pairing.lobby.len() < self.shared.config.lobby {
            pairing.lobby.push_back(link);
            return Ok(());
        }
        Err(format!(
            "the pool is full ({} workers already wait to be taken)",
            pairing.lobby.len()
        ))
    }

    async fn send_raw(&mut self, identity: &PeerIdentity, body: Bytes) {
        let mut message = ZmqMessage::from(body);
        message.push_front(identity.clone().into());
        let mut send = self.shared.send.clone();
        if let Err(err) = send.send(message).await {
            tracing::debug!(target: "pypool::zmq", peer = %show(identity), error = %err, "could not answer a joining peer");
        }
    }

    /// Refuses a peer that speaks the join protocol: tells it why, then disconnects it.
    async fn refuse(&mut self, identity: PeerIdentity, reason: &str) {
        self.log.warn(&self.shared.config.label, &identity, reason);
        self.strangers.remove(&identity);
        let body = control_body(&json!({"type": "reject", "reason": reason}));
        self.send_raw(&identity, body).await;
        if self.closing.len() >= MAX_STRANGERS {
            if let Some((_, oldest)) = self.closing.pop_front() {
                self.backend.peer_disconnected(&oldest);
            }
        }
        self.closing
            .push_back((Instant::now() + REJECT_LINGER, identity));
    }

    /// Disconnects a peer at once (it is not worth an answer).
    fn refuse_now(&mut self, identity: &PeerIdentity, reason: &str) {
        self.log.warn(&self.shared.config.label, identity, reason);
        self.strangers.remove(identity);
        self.backend.peer_disconnected(identity);
    }
}

/// The body of a message from an authenticated peer, checked (signed links) and joined into one
/// buffer; `Err` with the reason for a forged, replayed or malformed message.
fn route_body(route: &mut Route, frames: VecDeque<Bytes>) -> Inbound {
    let frames: Vec<Bytes> = frames.into();
    let body: &[Bytes] = match &mut route.verifier {
        Some(verifier) => {
            let Some((envelope, body)) = frames.split_first() else {
                return Err("an empty message".into());
            };
            let parts: Vec<&[u8]> = body.iter().map(|b| &b[..]).collect();
            verifier
                .check(envelope, &parts)
                .map_err(|refused| refused.to_string())?;
            body
        }
        None => &frames,
    };
    Ok(match body {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut joined = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
            for part in many {
                joined.extend_from_slice(part);
            }
            joined.freeze()
        }
    })
}

/// A JOIN or AUTH: one small JSON body (codec byte, header length, header).
fn control_message(frames: &VecDeque<Bytes>) -> Option<Value> {
    if frames.len() != 1 {
        return None;
    }
    let body = frames.front()?;
    if body.len() < 5 || body.len() > CONTROL_MAX || body[0] != b'J' {
        return None;
    }
    let header_len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if header_len != body.len() - 5 {
        return None;
    }
    let value: Value = serde_json::from_slice(&body[5..]).ok()?;
    value.is_object().then_some(value)
}

/// A JSON body for a control message (CHALLENGE, reject).
fn control_body(header: &Value) -> Bytes {
    let text = header.to_string();
    let mut body = BytesMut::with_capacity(5 + text.len());
    body.extend_from_slice(b"J");
    // Control headers are a few hundred bytes at most.
    body.extend_from_slice(&(text.len() as u32).to_be_bytes());
    body.extend_from_slice(text.as_bytes());
    body.freeze()
}

/// A routing identity for logs: text if it is printable, else hex.
pub(crate) fn show(identity: &PeerIdentity) -> String {
    match std::str::from_utf8(identity) {
        Ok(text) if text.chars().all(|c| !c.is_control()) => text.to_owned(),
        _ => hex::encode(&identity[..]),
    }
}

/// The identities the pool has authenticated, so that the tcp guard knows which connections
/// may send large messages.
#[derive(Clone, Default)]
pub(crate) struct Verdicts(Arc<VerdictsInner>);

#[derive(Default)]
pub(crate) struct VerdictsInner {
    authenticated: Mutex<HashSet<PeerIdentity>>,
    changed: Notify,
}

impl Verdicts {
    fn admit(&self, identity: PeerIdentity) {
        self.0.authenticated.lock().insert(identity);
        self.0.changed.notify_waiters();
    }

    fn forget(&self, identity: &PeerIdentity) {
        self.0.authenticated.lock().remove(identity);
    }

    /// Whether `identity` is (or becomes, by `deadline`) authenticated.
    pub(crate) async fn wait_authenticated(
        &self,
        identity: Option<PeerIdentity>,
        deadline: Instant,
    ) -> bool {
        let Some(identity) = identity else {
            return false;
        };
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.0.authenticated.lock().contains(&identity) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }
}

/// Logs refusals at `warn`, at most [`LOGS_PER_SECOND`] a second; the rest are counted and
/// summarised once a second, so a flood of strangers cannot flood the logs.
#[derive(Default)]
pub(crate) struct LogLimiter {
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn warn(&mut self, endpoint: &str, identity: &PeerIdentity, reason: &str) {
        self.warn_text(
            endpoint,
            &format!("refused a peer {}: {reason}", show(identity)),
        );
    }

    /// Logs `text` at `warn` within the rate.
    pub(crate) fn warn_text(&mut self, endpoint: &str, text: &str) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|start| now - start >= Duration::from_secs(1))
        {
            self.flush(endpoint);
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < LOGS_PER_SECOND {
            self.logged += 1;
            tracing::warn!(target: "pypool::zmq", endpoint, "{text}");
        } else {
            self.suppressed += 1;
        }
    }

    pub(crate) fn flush(&mut self, endpoint: &str) {
        if self.suppressed > 0 {
            tracing::warn!(target: "pypool::zmq", endpoint, "{} more refusals (not logged one by one)", self.suppressed);
            self.suppressed = 0;
        }
    }
}
