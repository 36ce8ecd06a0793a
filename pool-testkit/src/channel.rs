//! An in-memory frame channel, so fake workers speak the real protocol without a process.

use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use pool_core::{Channel, FrameReceiver, FrameSender};
use tokio::sync::mpsc;

struct MemSender(mpsc::Sender<Bytes>);
struct MemReceiver(mpsc::Receiver<Bytes>);

#[async_trait]
impl FrameSender for MemSender {
    async fn send(&mut self, body: Bytes) -> io::Result<()> {
        self.0
            .send(body)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "peer closed the channel"))
    }
}

#[async_trait]
impl FrameReceiver for MemReceiver {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.0.recv().await)
    }
}

/// The worker's end of an in-memory channel.
pub struct PeerEnd {
    /// Frames from the pool.
    pub rx: mpsc::Receiver<Bytes>,
    /// Frames to the pool.
    pub tx: mpsc::Sender<Bytes>,
}

/// A connected pair: the pool's [`Channel`] and the worker's [`PeerEnd`].
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use bytes::Bytes;
/// let (mut channel, mut peer) = pool_testkit::memory_channel(8);
/// channel.sender.send(Bytes::from_static(b"x")).await.unwrap();
/// assert_eq!(peer.rx.recv().await, Some(Bytes::from_static(b"x")));
/// # }
/// ```
pub fn memory_channel(capacity: usize) -> (Channel, PeerEnd) {
    let (to_worker, from_pool) = mpsc::channel(capacity);
    let (to_pool, from_worker) = mpsc::channel(capacity);
    (
        Channel {
            sender: Box::new(MemSender(to_worker)),
            receiver: Box::new(MemReceiver(from_worker)),
        },
        PeerEnd {
            rx: from_pool,
            tx: to_pool,
        },
    )
}
