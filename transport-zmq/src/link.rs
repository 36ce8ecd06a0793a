//! One authenticated worker's [`Channel`]: messages to it go out through the ROUTER with its
//! routing identity (signed on tcp), messages from it arrive from the hub's router task.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pool_core::{Channel, ExitInfo, FrameReceiver, FrameSender};
use tokio::sync::mpsc;
use zeromq::util::PeerIdentity;
use zeromq::{RouterSendHalf, SocketSend, ZmqMessage};

use crate::key::Signer;

/// Sent to the router task by links and launches.
pub(crate) enum Command {
    /// The link is dropped: forget the peer and disconnect it.
    Forget(PeerIdentity),
}

/// What the router hands a link: a checked body, or why the peer was dropped.
pub(crate) type Inbound = Result<Bytes, String>;

/// After a local worker's process has exited, how long its link still delivers messages that
/// were on their way (its last words: a STARTUP_ERROR, the result before an exit) before it
/// reports end-of-stream. The connection normally closes first; this bounds the case where a
/// descendant that left the worker's process group keeps the socket open.
const EXIT_DRAIN: Duration = Duration::from_millis(500);

/// A future that resolves when the worker's process has exited.
pub(crate) type Exited = Pin<Box<dyn Future<Output = ExitInfo> + Send>>;

pub(crate) struct LinkParts {
    pub(crate) identity: PeerIdentity,
    pub(crate) send: RouterSendHalf,
    pub(crate) inbox: mpsc::Receiver<Inbound>,
    pub(crate) signing: Option<Signer>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
}

/// An authenticated worker not yet given to the pool.
pub(crate) struct Link {
    sender: ZmqSender,
    receiver: ZmqReceiver,
}

impl Link {
    pub(crate) fn new(parts: LinkParts) -> Link {
        Link {
            sender: ZmqSender {
                identity: Bytes::from(parts.identity.clone()),
                send: parts.send,
                signer: parts.signing,
                max_frame: pool_core::protocol::DEFAULT_MAX_FRAME,
            },
            receiver: ZmqReceiver {
                identity: parts.identity,
                inbox: parts.inbox,
                max_frame: pool_core::protocol::DEFAULT_MAX_FRAME,
                exited: None,
                commands: parts.commands,
            },
        }
    }

    pub(crate) fn identity(&self) -> &PeerIdentity {
        &self.receiver.identity
    }

    /// The channel for the pool, enforcing `max_frame` both ways. With `exited`, the channel
    /// also ends (after a short drain) when the local worker's process has exited.
    pub(crate) fn into_channel(mut self, max_frame: usize, exited: Option<Exited>) -> Channel {
        self.sender.max_frame = max_frame;
        self.receiver.max_frame = max_frame;
        self.receiver.exited = exited;
        Channel {
            sender: Box::new(self.sender),
            receiver: Box::new(self.receiver),
        }
    }
}

struct ZmqSender {
    identity: Bytes,
    send: RouterSendHalf,
    signer: Option<Signer>,
    max_frame: usize,
}

#[async_trait]
impl FrameSender for ZmqSender {
    async fn send(&mut self, body: Bytes) -> io::Result<()> {
        if body.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty frame"));
        }
        if body.len() > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes exceeds the maximum of {}",
                    body.len(),
                    self.max_frame
                ),
            ));
        }
        let mut message = ZmqMessage::from(self.identity.clone());
        if let Some(signer) = &mut self.signer {
            let envelope = signer.envelope(&[&body]);
            message.push_back(Bytes::copy_from_slice(&envelope));
        }
        message.push_back(body);
        self.send
            .send(message)
            .await
            .map_err(|err| io::Error::new(io::ErrorKind::BrokenPipe, err.to_string()))
    }
}

struct ZmqReceiver {
    identity: PeerIdentity,
    inbox: mpsc::Receiver<Inbound>,
    max_frame: usize,
    exited: Option<Exited>,
    commands: mpsc::UnboundedSender<Command>,
}

impl ZmqReceiver {
    fn deliver(&self, inbound: Option<Inbound>) -> io::Result<Option<Bytes>> {
        match inbound {
            Some(Ok(body)) if body.len() > self.max_frame => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "frame of {} bytes exceeds the maximum of {}",
                    body.len(),
                    self.max_frame
                ),
            )),
            Some(Ok(body)) if body.is_empty() => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an empty message",
            )),
            Some(Ok(body)) => Ok(Some(body)),
            Some(Err(reason)) => Err(io::Error::new(io::ErrorKind::InvalidData, reason)),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl FrameReceiver for ZmqReceiver {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        let inbound = match &mut self.exited {
            None => self.inbox.recv().await,
            Some(exited) => {
                tokio::select! {
                    biased;
                    inbound = self.inbox.recv() => inbound,
                    _ = exited => {
                        self.exited = Some(Box::pin(std::future::pending()));
                        let drained = tokio::time::timeout(EXIT_DRAIN, self.inbox.recv()).await;
                        // Past the drain, nothing more is coming: end of stream.
                        self.inbox.close();
                        drained.ok().flatten()
                    }
                }
            }
        };
        self.deliver(inbound)
    }
}

impl Drop for ZmqReceiver {
    fn drop(&mut self) {
        // The pool is done with this worker: the router forgets it and drops its connection.
        let _ = self.commands.send(Command::Forget(self.identity.clone()));
    }
}
