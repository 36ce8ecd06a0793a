//! One accepted local-socket connection shared by the two halves of a [`Channel`].
//!
//! `interprocess` implements `AsyncRead`/`AsyncWrite` for `&Stream`, so the reading and the
//! writing half each hold an `Arc` of the same stream (its recommended replacement for the
//! deprecated `split`). Unlike the plain stream, shutting down the writing half really closes the
//! sending direction (the worker sees end-of-file), as on the stdio transport's pipes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use interprocess::local_socket::tokio::Stream;
use pool_core::protocol::channel_from_io;
use pool_core::Channel;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection, readable and writable through any clone.
#[derive(Clone)]
pub(crate) struct SharedStream(Arc<Stream>);

impl SharedStream {
    pub(crate) fn new(stream: Stream) -> Self {
        SharedStream(Arc::new(stream))
    }

    /// A framed channel over the connection, enforcing `max_frame` in both directions.
    pub(crate) fn into_channel(self, max_frame: usize) -> Channel {
        channel_from_io(self.clone(), self, max_frame)
    }
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut stream: &Stream = &self.0;
        Pin::new(&mut stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut stream: &Stream = &self.0;
        Pin::new(&mut stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut stream: &Stream = &self.0;
        Pin::new(&mut stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        let stream: &Stream = &self.0;
        stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(shutdown_write(&self.0))
    }
}

/// Closes the sending direction, so that the peer reads end-of-file.
#[cfg(unix)]
fn shutdown_write(stream: &Stream) -> io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let Stream::UdSocket(socket) = stream;
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: `fd` is the open socket the borrowed stream owns; shutdown takes no memory
    // arguments and does not close the descriptor.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOTCONN) {
        // The peer is gone already: the direction is as closed as it gets.
        Ok(())
    } else {
        Err(err)
    }
}

/// Named pipes have no half-close; the pipe closes when both halves are dropped.
#[cfg(not(unix))]
fn shutdown_write(_stream: &Stream) -> io::Result<()> {
    Ok(())
}
