//! ZeroMQ transport for pypool: a ROUTER socket in the pool, a DEALER (pyzmq) in each worker,
//! for workers the pool spawns on this machine and for workers that join from other machines.
//!
//! pypool keeps pools of long-lived Python processes for Rust services. The pool engine in
//! `pool-core` owns all policy (queueing, deadlines, health, recycling); a transport only starts
//! or admits workers and moves frames. This crate's [`ZmqLauncher`] implements
//! [`pool_core::Launcher`] (name `"zmq"`) on the pure-Rust [`zeromq`] crate (ZMTP 3):
//!
//! * **Local mode** ([`ZmqLauncher::new`]): the ROUTER listens on `ipc://` in a private
//!   directory; each worker is spawned through `pool-process` (process tree, parent-death
//!   signal, stderr tail, reaping, exactly as for the stdio and ipc transports) and connects a
//!   DEALER whose routing identity the launch chose.
//! * **Remote mode** ([`ZmqLauncher::remote`]): the ROUTER listens on `tcp://ADDR:PORT`;
//!   `python -m pypool_worker --app APP --transport zmq --connect tcp://HOST:PORT --secret-file
//!   FILE [--workers N]`, on any machine, joins the pool, and each launch takes the next worker
//!   that joined. Its disappearance is noticed by the pool's own PING/PONG (busy workers without
//!   a process handle are pinged too) or by its connection closing, and fails its calls with
//!   `Error::WorkerCrashed`; a worker that comes back is a new worker.
//!
//! # Security
//!
//! The `zeromq` crate has no CURVE, so pypool authenticates and signs itself (`PROTOCOL.md`,
//! section 9): a connection must JOIN and answer an HMAC-SHA256 CHALLENGE under the pool's
//! secret before anything else, and on `tcp://` every later message carries an HMAC-SHA256
//! over its contents under a per-connection key with a per-direction sequence number, so
//! forgeries, alterations and replays are refused and the peer dropped. Strangers are refused,
//! logged (rate-limited) and disconnected, never served. **Traffic is signed, not encrypted**:
//! anyone who can watch the network reads call arguments and results. Keep remote pools on a
//! private network or inside a tunnel (WireGuard, SSH port forwarding, stunnel).
//!
//! # The `zeromq` crate's gaps, and what this crate does about them
//!
//! * No way to drop one peer from a ROUTER: refused and finished peers are disconnected through
//!   `MultiPeerBackend::peer_disconnected`, the hook the crate uses itself.
//! * No ZMTP heartbeats and no socket monitor for liveness on ROUTER/DEALER beyond disconnect
//!   events: pypool's PING/PONG decides, and disconnect events end a worker's channel at once.
//! * A DEALER that reconnects with an identity already connected takes the identity over;
//!   on `tcp://` its first message then fails the signature check and the worker is dropped.
//! * No maximum message size (`ZMQ_MAXMSGSIZE`) and no deadline for a connection's ZMTP
//!   handshake: the crate's decoder reserves whatever length a frame header announces (10 bytes
//!   announcing a terabyte abort the process). So on `tcp://` the ROUTER listens only on a
//!   private Unix socket and a guard owns the public port: it relays each connection, parsing
//!   ZMTP frame headers as they pass, and ends connections that send oversized frames, too many
//!   frames, or large messages before authenticating, or that do not finish the ZMTP handshake
//!   within the auth timeout.
//!
//! # Platforms
//!
//! Unix (tested on Linux): the ROUTER's private socket, the guard and local process control use
//! Unix facilities.
#![warn(missing_docs)]

#[cfg(unix)]
mod guard;
mod hub;
mod key;
mod launcher;
mod link;
#[cfg(unix)]
mod place;

pub use key::{Key, KeyError, ENVELOPE_LEN, MAC_LEN, MIN_KEY_LEN};
pub use launcher::{
    ZmqLauncher, DEFAULT_AUTH_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LOBBY, ENV_CONNECT,
    ENV_IDENTITY,
};
