//! Serializes replies from concurrent request tasks onto one socket.
//!
//! A mutex around the write half (rather than a channel to a writer task)
//! keeps data zero-copy: a task writes its header and payload with one
//! vectored write while holding the lock, so chunks never interleave
//! mid-message yet replies of different requests may interleave freely.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tracing::debug;

pub(crate) struct ReplyWriter<W> {
    inner: Mutex<W>,
    broken: AtomicBool,
}

impl<W: AsyncWrite + Unpin + Send> ReplyWriter<W> {
    pub(crate) fn new(w: W) -> Self {
        Self {
            inner: Mutex::new(w),
            broken: AtomicBool::new(false),
        }
    }

    /// Once a write failed the stream is out of sync: later replies are
    /// dropped and the request loop stops.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Write one message made of `parts`, atomically with respect to other
    /// messages. Returns false if the connection is dead.
    pub(crate) async fn send(&self, parts: &[&[u8]]) -> bool {
        if self.is_broken() {
            return false;
        }
        let mut w = self.inner.lock().await;
        // Flush per message: a TLS stream may otherwise keep the end of a
        // reply in its buffer while the client waits for it (a no-op on
        // plain sockets).
        let res = match write_all_vectored(&mut *w, parts).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => true,
            Err(e) => {
                debug!("reply write failed: {e}");
                self.broken.store(true, Ordering::Relaxed);
                false
            }
        }
    }

    /// Flush and half-close, so the peer sees EOF after the last reply.
    pub(crate) async fn close(&self) {
        let mut w = self.inner.lock().await;
        let _ = w.shutdown().await;
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}
