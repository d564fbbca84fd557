//! The relay between an HBONE stream (h2 send + receive halves) and a TCP-like stream.
use std::future::poll_fn;
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TunnelError;
use crate::capture::splice::Joined;

/// Largest read from the local stream: with h2's capacity reservation this bounds what one direction of
/// one relay holds in memory.
pub const CHUNK: usize = 64 * 1024;

/// The first read of a relay direction. Reads grow towards [`CHUNK`] while they come back full, so an
/// idle or chatty connection holds a small buffer and a bulk one soon reads in large ones.
pub const FIRST_READ: usize = 512;

/// The size of the next read after one of `n` bytes into a buffer of `want`.
pub fn next_read_size(want: usize, n: usize) -> usize {
    if n >= want {
        (want * 2).min(CHUNK)
    } else {
        want
    }
}

/// Byte counters of one relay, readable while it runs (access log, metrics). `sent` counts bytes that
/// went from the local stream into the tunnel, `received` bytes from the tunnel to the local stream.
/// Bytes the kernel carries on the same-node fast path are counted there and added in.
#[derive(Default)]
pub struct CopyStats {
    sent: AtomicU64,
    received: AtomicU64,
    kernel: Mutex<Option<Arc<Joined>>>,
}

impl std::fmt::Debug for CopyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyStats")
            .field("sent", &self.sent())
            .field("received", &self.received())
            .finish()
    }
}

impl CopyStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes handed to h2 for sending to the peer so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.in_kernel().0
    }

    /// Bytes written to the local stream so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed) + self.in_kernel().1
    }

    /// Bytes relayed by userspace only: (sent, received).
    pub(crate) fn in_user(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    fn in_kernel(&self) -> (u64, u64) {
        self.kernel
            .lock()
            .ok()
            .and_then(|k| k.as_ref().map(|j| j.redirected()))
            .unwrap_or((0, 0))
    }

    /// From now on also counts what the kernel carries for this joined pair (`a` → `b` is sent).
    pub(crate) fn add_kernel(&self, joined: Arc<Joined>) {
        if let Ok(mut k) = self.kernel.lock() {
            *k = Some(joined);
        }
    }

    /// Folds the kernel's final counts into the totals and lets go of the joined pair.
    pub(crate) fn settle_kernel(&self) {
        let Some(joined) = self.kernel.lock().ok().and_then(|mut k| k.take()) else {
            return;
        };
        let (sent, received) = joined.redirected();
        self.add_sent(sent as usize);
        self.add_received(received as usize);
    }

    pub(crate) fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Totals of a relay that ended cleanly (both directions saw their end of stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyOutcome {
    /// Bytes from the local stream into the tunnel.
    pub sent: u64,
    /// Bytes from the tunnel to the local stream.
    pub received: u64,
}

/// Relays bytes both ways between an HBONE stream and `io` until both directions ended.
///
/// Half-close is carried through: EOF on `io` sends END_STREAM; END_STREAM from the peer shuts down
/// `io`'s write half (TCP FIN) while the other direction keeps flowing. On an error in either direction
/// the other one stops: the HBONE stream is reset (RST_STREAM CANCEL) and `io` is dropped. Byte counts
/// are in `stats`, which is also the way to know them after an error.
pub async fn copy_bidirectional<T>(
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    io: T,
    stats: &CopyStats,
) -> Result<CopyOutcome, TunnelError>
where
    T: AsyncRead + AsyncWrite + Send,
{
    let (mut io_read, mut io_write) = tokio::io::split(io);
    let result = tokio::try_join!(
        local_to_tunnel(&mut io_read, send, stats),
        tunnel_to_local(recv, &mut io_write, stats),
    );
    match result {
        Ok(_) => Ok(CopyOutcome {
            sent: stats.sent(),
            received: stats.received(),
        }),
        Err(e) => {
            // Tells the peer to drop its side too; a no-op when the peer already reset the stream.
            send.send_reset(Reason::CANCEL);
            Err(e)
        }
    }
}

/// Copies `io` into the tunnel, ending with END_STREAM at EOF.
async fn local_to_tunnel<R>(
    io: &mut R,
    send: &mut SendStream<Bytes>,
    stats: &CopyStats,
) -> Result<(), TunnelError>
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::new();
    let mut want = FIRST_READ;
    loop {
        buf.reserve(want);
        // While the app is silent, a reset of the stream must still end the relay: otherwise a
        // half-closed stream (peer done sending) would wait on the app forever.
        let n = tokio::select! {
            read = io.read_buf(&mut buf) => read?,
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                return Err(match reset {
                    Ok(reason) => TunnelError::Reset(reason),
                    Err(e) => TunnelError::from_stream(e),
                });
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)
                .map_err(TunnelError::from_stream)?;
            return Ok(());
        }
        want = next_read_size(want, n);
        let chunk = buf.split().freeze();
        send_all(send, chunk, stats).await?;
    }
}

/// Sends `data` within the stream's flow-control capacity, so h2 never buffers more than was reserved.
pub(crate) async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    stats: &CopyStats,
) -> Result<(), TunnelError> {
    while !data.is_empty() {
        let capacity = wait_capacity(send, data.len()).await?;
        let piece = data.split_to(capacity.min(data.len()));
        let len = piece.len();
        send.send_data(piece, false)
            .map_err(TunnelError::from_stream)?;
        stats.add_sent(len);
    }
    Ok(())
}

/// Reserves up to `wanted` bytes of send capacity and waits until some is assigned.
async fn wait_capacity(send: &mut SendStream<Bytes>, wanted: usize) -> Result<usize, TunnelError> {
    send.reserve_capacity(wanted);
    loop {
        let available = send.capacity();
        if available > 0 {
            return Ok(available);
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(TunnelError::from_stream(e)),
            // The send side is no longer open: the peer reset the stream, or the connection ended.
            None => return Err(closed_reason(send).await),
        }
    }
}

/// The reason a stream stopped accepting data, for the error report.
async fn closed_reason(send: &mut SendStream<Bytes>) -> TunnelError {
    let probe = poll_fn(|cx| match send.poll_reset(cx) {
        std::task::Poll::Pending => std::task::Poll::Ready(None),
        std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
    });
    match probe.await {
        Some(Ok(reason)) => TunnelError::Reset(reason),
        Some(Err(e)) => TunnelError::from_stream(e),
        None => TunnelError::Reset(Reason::STREAM_CLOSED),
    }
}

/// Copies the tunnel into `io`, shutting down `io`'s write half at END_STREAM.
async fn tunnel_to_local<W>(
    recv: &mut RecvStream,
    io: &mut W,
    stats: &CopyStats,
) -> Result<(), TunnelError>
where
    W: AsyncWrite + Unpin,
{
    while let Some(data) = recv.data().await {
        let data = data.map_err(TunnelError::from_stream)?;
        io.write_all(&data).await?;
        // Buffering writers (TLS) would otherwise hold the bytes until the next write.
        io.flush().await?;
        // The window opens again only once the bytes left our hands, so a slow local reader slows the
        // peer instead of growing our buffers.
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(TunnelError::from_stream)?;
        stats.add_received(data.len());
    }
    io.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_while_full_up_to_a_chunk_and_stay_small_otherwise() {
        let mut want = FIRST_READ;
        for _ in 0..3 {
            want = next_read_size(want, 1);
        }
        assert_eq!(want, FIRST_READ, "small reads keep the first size");
        let mut steps = 0;
        while want < CHUNK {
            want = next_read_size(want, want);
            steps += 1;
        }
        assert_eq!(want, CHUNK);
        assert!(
            steps <= 7,
            "bulk reaches full-size reads within a few reads"
        );
        assert_eq!(next_read_size(CHUNK, CHUNK), CHUNK, "never beyond a chunk");
    }
}
