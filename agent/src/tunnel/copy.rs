//! The relay between an HBONE stream (h2 send + receive halves) and a TCP-like stream.
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::TunnelError;
use crate::capture::splice::Joined;

/// Largest read from the local stream: with h2's capacity reservation this bounds what one direction of
/// one relay holds in memory.
pub const CHUNK: usize = 64 * 1024;

/// The first read of a relay direction. Reads grow towards [`CHUNK`] while they come back full, so an
/// idle or chatty connection holds a small buffer and a bulk one soon reads in large ones.
pub const FIRST_READ: usize = 512;

/// The size of the next read after one of `n` bytes into a buffer of `want` (`n` may be more than
/// `want` where the read was topped up).
pub fn next_read_size(want: usize, n: usize) -> usize {
    if n >= want {
        (want * 2).max(n.next_power_of_two()).min(CHUNK)
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

/// The local end of a relay: a TCP socket of this node, or a wrapper of one.
///
/// Its read readiness is what lets an idle relay hold no buffer: one is taken only once bytes (or the
/// end of stream) are there to be read, and handed on with them.
pub trait LocalStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once a read would not wait (bytes, end of stream or an error are queued).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl LocalStream for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl LocalStream for Box<dyn LocalStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// Relays bytes both ways between an HBONE stream and `io` until both directions ended.
///
/// Half-close is carried through: EOF on `io` sends END_STREAM; END_STREAM from the peer shuts down
/// `io`'s write half (TCP FIN) while the other direction keeps flowing. On an error in either direction
/// the other one stops: the HBONE stream is reset (RST_STREAM CANCEL) and `io` is dropped. Byte counts
/// are in `stats`, which is also the way to know them after an error.
pub fn copy_bidirectional<T: LocalStream>(
    send: SendStream<Bytes>,
    recv: RecvStream,
    io: T,
    stats: Arc<CopyStats>,
) -> Relay<T> {
    Relay::new(send, recv, io, stats, Bytes::new(), ())
}

/// The future of [`copy_bidirectional`], holding `guard` until it ends.
///
/// A plain state machine rather than two joined `async` blocks: it lives as long as the connection,
/// so its size is paid per connection, and while the connection is idle it holds no buffer in either
/// direction.
pub struct Relay<T, G = ()> {
    send: SendStream<Bytes>,
    recv: RecvStream,
    io: T,
    stats: Arc<CopyStats>,
    up: Up,
    down: Down,
    _guard: G,
}

impl<T: LocalStream, G> Relay<T, G> {
    /// A relay that first writes `received` (bytes taken from `recv` before it started) into `io`.
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        io: T,
        stats: Arc<CopyStats>,
        received: Bytes,
        guard: G,
    ) -> Self {
        let down = if received.is_empty() {
            Down::Receiving
        } else {
            Down::Writing {
                len: received.len(),
                data: received,
            }
        };
        Relay {
            send,
            recv,
            io,
            stats,
            up: Up::Reading { want: FIRST_READ },
            down,
            _guard: guard,
        }
    }
}

/// Local stream into the tunnel.
enum Up {
    /// Waiting for the local stream to have something; the next read takes `want` bytes at most.
    Reading { want: usize },
    /// Handing `data` to h2 within the stream's flow-control capacity, so h2 never buffers more than
    /// was reserved; `reserved` once capacity for the rest of `data` was asked for.
    Sending {
        data: Bytes,
        want: usize,
        reserved: bool,
    },
    /// END_STREAM sent.
    Done,
}

/// Tunnel into the local stream.
enum Down {
    Receiving,
    /// Writing what is left of a DATA frame of `len` bytes.
    Writing {
        data: Bytes,
        len: usize,
    },
    /// Written; flushing before the window opens again (buffering writers would hold the bytes).
    Flushing {
        len: usize,
    },
    /// END_STREAM received: the local stream's write half is being shut down.
    Closing,
    Done,
}

impl<T: LocalStream, G: Unpin> Future for Relay<T, G> {
    type Output = Result<CopyOutcome, TunnelError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let up = this.poll_up(cx);
        let down = match up {
            Poll::Ready(Err(_)) => Poll::Pending,
            _ => this.poll_down(cx),
        };
        match (up, down) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                // Tells the peer to drop its side too; a no-op when the peer already reset the
                // stream.
                this.send.send_reset(Reason::CANCEL);
                this.up = Up::Done;
                this.down = Down::Done;
                Poll::Ready(Err(e))
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(CopyOutcome {
                sent: this.stats.sent(),
                received: this.stats.received(),
            })),
            _ => Poll::Pending,
        }
    }
}

impl<T: LocalStream, G> Relay<T, G> {
    /// Copies the local stream into the tunnel, ending with END_STREAM at EOF.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TunnelError>> {
        loop {
            match &mut self.up {
                Up::Reading { want } => {
                    // While the app is silent, a reset of the stream must still end the relay:
                    // otherwise a half-closed stream (peer done sending) would wait on the app
                    // forever.
                    if let Poll::Ready(reset) = self.send.poll_reset(cx) {
                        return Poll::Ready(Err(match reset {
                            Ok(reason) => TunnelError::Reset(reason),
                            Err(e) => TunnelError::from_stream(e),
                        }));
                    }
                    ready!(self.io.poll_read_ready(cx))?;
                    let want = *want;
                    let mut buf = BytesMut::with_capacity(want);
                    let n = {
                        let mut read = ReadBuf::uninit(&mut buf.spare_capacity_mut()[..want]);
                        // Pending here means the readiness was stale: the buffer goes back, and the
                        // next readiness takes a new one.
                        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
                        read.filled().len()
                    };
                    if n == 0 {
                        self.send
                            .send_data(Bytes::new(), true)
                            .map_err(TunnelError::from_stream)?;
                        self.up = Up::Done;
                        continue;
                    }
                    // SAFETY: the read initialized the first `n` bytes of the spare capacity.
                    unsafe { buf.set_len(n) };
                    top_up(&mut self.io, cx, &mut buf)?;
                    let n = buf.len();
                    self.up = Up::Sending {
                        data: buf.freeze(),
                        want: next_read_size(want, n),
                        reserved: false,
                    };
                }
                Up::Sending {
                    data,
                    want,
                    reserved,
                } => {
                    if data.is_empty() {
                        self.up = Up::Reading { want: *want };
                        continue;
                    }
                    if !*reserved {
                        self.send.reserve_capacity(data.len());
                        *reserved = true;
                    }
                    let capacity = self.send.capacity();
                    if capacity == 0 {
                        match ready!(self.send.poll_capacity(cx)) {
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => return Poll::Ready(Err(TunnelError::from_stream(e))),
                            // The send side is no longer open: the peer reset the stream, or the
                            // connection ended.
                            None => return Poll::Ready(Err(closed_reason(&mut self.send, cx))),
                        }
                    }
                    let piece = data.split_to(capacity.min(data.len()));
                    let len = piece.len();
                    self.send
                        .send_data(piece, false)
                        .map_err(TunnelError::from_stream)?;
                    self.stats.add_sent(len);
                    *reserved = false;
                }
                Up::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Copies the tunnel into the local stream, shutting down its write half at END_STREAM.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TunnelError>> {
        loop {
            match &mut self.down {
                Down::Receiving => match ready!(self.recv.poll_data(cx)) {
                    Some(Ok(data)) => {
                        let len = data.len();
                        self.down = Down::Writing { data, len };
                    }
                    Some(Err(e)) => return Poll::Ready(Err(TunnelError::from_stream(e))),
                    None => self.down = Down::Closing,
                },
                Down::Writing { data, len } => {
                    while !data.is_empty() {
                        let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
                        if n == 0 {
                            return Poll::Ready(Err(
                                io::Error::from(io::ErrorKind::WriteZero).into()
                            ));
                        }
                        data.advance(n);
                    }
                    self.down = Down::Flushing { len: *len };
                }
                Down::Flushing { len } => {
                    let len = *len;
                    ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                    // The window opens again only once the bytes left our hands, so a slow local
                    // reader slows the peer instead of growing our buffers.
                    self.recv
                        .flow_control()
                        .release_capacity(len)
                        .map_err(TunnelError::from_stream)?;
                    self.stats.add_received(len);
                    self.down = Down::Receiving;
                }
                Down::Closing => {
                    ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
                    self.down = Down::Done;
                }
                Down::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Reads on into `buf` while the reads fill it, up to [`CHUNK`]. A small first read that came back
/// full most likely left the rest of a message queued: taken now, it goes on as one frame (one TLS
/// record, one segment) instead of two, each of which would wake the peer. The last read, the one
/// that finds the queue empty, is the read the next round would have made anyway.
fn top_up<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> io::Result<()> {
    while buf.len() == buf.capacity() && buf.len() < CHUNK {
        buf.reserve(buf.len().min(CHUNK - buf.len()));
        let len = buf.len();
        let room = (buf.capacity() - len).min(CHUNK - len);
        let m = {
            let mut read = ReadBuf::uninit(&mut buf.spare_capacity_mut()[..room]);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                // Pending registered the task for the next bytes, which the next round waits for.
                Poll::Pending => return Ok(()),
                Poll::Ready(r) => {
                    r?;
                    read.filled().len()
                }
            }
        };
        if m == 0 {
            // End of stream: the next round's read sees it again.
            return Ok(());
        }
        // SAFETY: the read initialized the next `m` bytes of the spare capacity.
        unsafe { buf.set_len(len + m) };
        if m < room {
            return Ok(());
        }
    }
    Ok(())
}

/// The reason a stream stopped accepting data, for the error report.
fn closed_reason(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> TunnelError {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => TunnelError::Reset(reason),
        Poll::Ready(Err(e)) => TunnelError::from_stream(e),
        Poll::Pending => TunnelError::Reset(Reason::STREAM_CLOSED),
    }
}

/// A loopback connection with `n` bytes queued at its reader, for tests of reads.
#[cfg(test)]
pub(crate) fn queued_loopback(n: usize) -> io::Result<(std::net::TcpStream, TcpStream)> {
    use std::io::Write;
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Room for every byte without the reader reading: the test needs them all queued at once.
    listener.set_recv_buffer_size(1 << 20)?;
    listener.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    listener.listen(1)?;
    let addr = listener
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))?;
    let mut writer = std::net::TcpStream::connect(addr)?;
    let (reader, _) = listener.accept()?;
    let reader: std::net::TcpStream = reader.into();
    writer.write_all(&vec![7u8; n])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let queued = crate::netns::unread_bytes(&reader)?;
        if queued as usize >= n {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "only {queued} of {n} bytes queued"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    reader.set_nonblocking(true)?;
    Ok((writer, TcpStream::from_std(reader)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the relay reads at once from a fresh connection with `queued` bytes waiting.
    async fn first_read(queued: usize) -> io::Result<usize> {
        let (_writer, mut reader) = queued_loopback(queued)?;
        reader.readable().await?;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = BytesMut::with_capacity(FIRST_READ);
        let n = {
            let mut read = ReadBuf::uninit(&mut buf.spare_capacity_mut()[..FIRST_READ]);
            match Pin::new(&mut reader).poll_read(&mut cx, &mut read) {
                Poll::Ready(r) => r.map(|()| read.filled().len())?,
                Poll::Pending => return Err(io::Error::other("queued bytes not readable")),
            }
        };
        // SAFETY: the read initialized the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(n) };
        top_up(&mut reader, &mut cx, &mut buf)?;
        Ok(buf.len())
    }

    #[tokio::test]
    async fn a_message_larger_than_the_first_read_goes_on_whole() -> io::Result<()> {
        assert_eq!(first_read(1024).await?, 1024);
        assert_eq!(first_read(3000).await?, 3000);
        assert_eq!(first_read(FIRST_READ).await?, FIRST_READ);
        assert_eq!(first_read(100).await?, 100);
        assert_eq!(
            first_read(CHUNK + 4096).await?,
            CHUNK,
            "one frame holds a chunk at most"
        );
        Ok(())
    }

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
        assert_eq!(
            next_read_size(FIRST_READ, 3000),
            4096,
            "a topped-up read sets the next size"
        );
        assert_eq!(next_read_size(FIRST_READ, 10 * CHUNK), CHUNK);
    }
}
