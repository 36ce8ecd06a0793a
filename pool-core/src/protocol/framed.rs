//! Length-prefixed framing over any async byte stream, for transports built on pipes or sockets.

use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::launcher::{Channel, FrameReceiver, FrameSender};

fn codec(max_frame: usize) -> LengthDelimitedCodec {
    // The codec checks the announced length against the maximum before it reserves any memory.
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

/// The sending half of [`channel_from_io`].
///
/// Writes the length prefix and the body straight to the writer, without copying large bodies
/// into a buffer first. Like any `write_all`, a send cancelled part way leaves a partial frame, so
/// the pool gives each channel's sender to a single writer task that is never cancelled mid-frame.
pub struct FramedSender<W> {
    writer: W,
    max_frame: usize,
    small: Vec<u8>,
}

/// Bodies up to this size are copied behind their length prefix and written in one call; larger
/// ones are written in place, after the prefix.
const COALESCE_LIMIT: usize = 16 * 1024;

/// A batch of small frames is written once it has buffered this much.
const BATCH_LIMIT: usize = 256 * 1024;

/// The receiving half of [`channel_from_io`].
pub struct FramedReceiver<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

#[async_trait]
impl<W: AsyncWrite + Unpin + Send + Sync> FrameSender for FramedSender<W> {
    async fn send(&mut self, body: Bytes) -> io::Result<()> {
        self.check(&body)?;
        let prefix = (body.len() as u32).to_be_bytes();
        if body.len() <= COALESCE_LIMIT {
            self.small.clear();
            self.small.extend_from_slice(&prefix);
            self.small.extend_from_slice(&body);
            self.writer.write_all(&self.small).await?;
        } else {
            self.writer.write_all(&prefix).await?;
            self.writer.write_all(&body).await?;
        }
        self.writer.flush().await
    }

    async fn send_many(&mut self, bodies: &mut Vec<Bytes>) -> io::Result<()> {
        for body in bodies.iter() {
            self.check(body)?;
        }
        // Small frames are copied behind their prefixes into one buffer; a large one is written
        // in place after flushing what came before it. Mostly that is one write for the batch.
        self.small.clear();
        for body in bodies.drain(..) {
            let prefix = (body.len() as u32).to_be_bytes();
            if body.len() <= COALESCE_LIMIT {
                self.small.extend_from_slice(&prefix);
                self.small.extend_from_slice(&body);
                if self.small.len() >= BATCH_LIMIT {
                    self.writer.write_all(&self.small).await?;
                    self.small.clear();
                }
            } else {
                self.small.extend_from_slice(&prefix);
                self.writer.write_all(&self.small).await?;
                self.small.clear();
                self.writer.write_all(&body).await?;
            }
        }
        if !self.small.is_empty() {
            self.writer.write_all(&self.small).await?;
            self.small.clear();
        }
        self.writer.flush().await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }
}

impl<W> FramedSender<W> {
    /// Refuses an empty frame or one over the maximum (before anything of a batch is written).
    fn check(&self, body: &Bytes) -> io::Result<()> {
        if body.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty frame"));
        }
        if body.len() > self.max_frame || u32::try_from(body.len()).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes exceeds the maximum of {}",
                    body.len(),
                    self.max_frame
                ),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl<R: AsyncRead + Unpin + Send> FrameReceiver for FramedReceiver<R> {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self.inner.next().await {
            Some(Ok(frame)) => Ok(Some(frame.freeze())),
            Some(Err(err)) => Err(err),
            None => Ok(None),
        }
    }
}

/// Builds a [`Channel`] from a byte-stream pair, with 4-byte big-endian length framing and a
/// maximum frame size enforced in both directions.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use bytes::Bytes;
/// use pool_core::protocol::channel_from_io;
///
/// let (a, b) = tokio::io::duplex(1024);
/// let (a_read, a_write) = tokio::io::split(a);
/// let (b_read, b_write) = tokio::io::split(b);
/// let mut left = channel_from_io(a_read, a_write, 1 << 20);
/// let mut right = channel_from_io(b_read, b_write, 1 << 20);
/// left.sender.send(Bytes::from_static(b"hello")).await?;
/// assert_eq!(right.receiver.recv().await?, Some(Bytes::from_static(b"hello")));
/// # Ok(()) }
/// ```
pub fn channel_from_io<R, W>(reader: R, writer: W, max_frame: usize) -> Channel
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + Sync + 'static,
{
    Channel {
        sender: Box::new(FramedSender {
            writer,
            max_frame,
            small: Vec::with_capacity(COALESCE_LIMIT + 4),
        }),
        receiver: Box::new(FramedReceiver {
            inner: FramedRead::new(reader, codec(max_frame)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn oversize_frame_is_rejected_before_allocation() {
        let (mut raw, peer) = tokio::io::duplex(64);
        let (peer_read, peer_write) = tokio::io::split(peer);
        let mut channel = channel_from_io(peer_read, peer_write, 1024);
        // Announce 1 GiB and send nothing more: the receiver must fail on the header alone.
        raw.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let err = channel.receiver.recv().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn oversize_frame_is_refused_on_send() {
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        let mut channel = channel_from_io(r, w, 8);
        let err = channel
            .sender
            .send(Bytes::from(vec![1u8; 9]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn eof_between_frames_is_a_clean_end() {
        let (a, b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        let mut channel = channel_from_io(r, w, 64);
        drop(b);
        assert_eq!(channel.receiver.recv().await.unwrap(), None);
    }
}
