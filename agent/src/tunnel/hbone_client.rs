//! The client end of an HBONE connection: opens one CONNECT stream per proxied TCP connection.
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::copy::{CHUNK, CopyStats, LocalStream, Relay};
use super::error::h2_to_io;
use super::settings::keepalive;
use super::wire::{FORWARDED, format_authority, format_forwarded};
use super::{AsyncIo, H2Settings, Keepalive, TunnelError};

/// Settings of an outbound HBONE connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub h2: H2Settings,
    /// `None` disables PINGs (tests); the default is ztunnel's 10 s / 20 s.
    pub keepalive: Option<Keepalive>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            h2: H2Settings::default(),
            keepalive: Some(Keepalive::default()),
        }
    }
}

/// One HTTP/2 connection to a peer's HBONE port. Cheap to clone; clones share the connection.
///
/// The connection is driven by a spawned task that ends when the peer closes it, on an error, on a
/// keepalive timeout, or once every clone is dropped and its streams ended.
#[derive(Clone)]
pub struct HboneClient {
    send: SendRequest<Bytes>,
    shared: Arc<Shared>,
}

/// State shared by the clones of a client, its streams and its driver task.
struct Shared {
    /// Streams open or reserved (see [`StreamSlot`]).
    active: AtomicUsize,
    /// Set when the peer refused new streams (GOAWAY) or a stream could not be opened.
    going_away: AtomicBool,
    /// `true` once the driver task ended.
    closed: watch::Sender<bool>,
    /// When the last stream ended; the pool releases connections idle for too long.
    idle_since: Mutex<Instant>,
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("id", &self.id())
            .field("active_streams", &self.active_streams())
            .field("closed", &self.is_closed())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl HboneClient {
    /// HTTP/2 handshake over `io` with the default settings (ztunnel's).
    pub async fn handshake<T: AsyncIo>(io: T) -> Result<Self, TunnelError> {
        Self::handshake_with(io, ClientConfig::default()).await
    }

    pub async fn handshake_with<T: AsyncIo>(
        io: T,
        config: ClientConfig,
    ) -> Result<Self, TunnelError> {
        let s = &config.h2;
        let (send, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(s.initial_stream_window)
            .initial_connection_window_size(s.initial_connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .max_send_buffer_size(s.max_send_buffer_size)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(TunnelError::Handshake)?;
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            active: AtomicUsize::new(0),
            going_away: AtomicBool::new(false),
            closed,
            idle_since: Mutex::new(Instant::now()),
        });
        let ping_pong = connection.ping_pong();
        let task_shared = shared.clone();
        tokio::spawn(async move {
            let keepalive = async {
                match (ping_pong, config.keepalive) {
                    (Some(pp), Some(cfg)) => keepalive(pp, cfg).await,
                    _ => std::future::pending().await,
                }
            };
            let result = tokio::select! {
                r = &mut connection => r.map_err(TunnelError::Connection),
                timeout = keepalive => Err(TunnelError::KeepaliveTimeout(timeout)),
            };
            match result {
                Ok(()) => tracing::debug!("HBONE client connection closed"),
                Err(e) => tracing::debug!(error = %e, "HBONE client connection ended"),
            }
            task_shared.going_away.store(true, Ordering::Release);
            task_shared.closed.send_replace(true);
        });
        Ok(HboneClient { send, shared })
    }

    /// Opens a CONNECT stream to `target` (a workload `ip:port` behind the peer), telling the peer the
    /// original client address. Waits while the peer's stream limit is reached. Does not time out by
    /// itself: wrap it in `tokio::time::timeout`.
    pub async fn connect(
        &self,
        target: SocketAddr,
        forwarded_for: SocketAddr,
    ) -> Result<HboneStream, TunnelError> {
        self.connect_in_slot(target, forwarded_for, Bytes::new(), self.reserve_slot())
            .await
    }

    /// Like [`HboneClient::connect`], with the connection's first bytes right behind the request
    /// (see `HboneClient::connect_in_slot`).
    pub async fn connect_with_early_data(
        &self,
        target: SocketAddr,
        forwarded_for: SocketAddr,
        early: Bytes,
    ) -> Result<HboneStream, TunnelError> {
        self.connect_in_slot(target, forwarded_for, early, self.reserve_slot())
            .await
    }

    /// Like [`HboneClient::connect`], sending `early` — the first bytes of the proxied connection —
    /// right behind the request, in the same write, instead of a round trip later. The peer delivers
    /// them once it accepted the stream and discards them with the stream otherwise, so the caller
    /// must not count them as sent before this returns a stream.
    pub(crate) async fn connect_in_slot(
        &self,
        target: SocketAddr,
        forwarded_for: SocketAddr,
        early: Bytes,
        slot: StreamSlot,
    ) -> Result<HboneStream, TunnelError> {
        if !self.is_ready() {
            return Err(TunnelError::Closed);
        }
        let mut send = self.send.clone();
        if let Err(e) = poll_fn(|cx| send.poll_ready(cx)).await {
            return Err(self.unusable(e));
        }
        let request = connect_request(target, forwarded_for)?;
        let (response, mut send_stream) = match send.send_request(request, false) {
            Ok(pair) => pair,
            Err(e) => return Err(self.unusable(e)),
        };
        if !early.is_empty() {
            // Queued before the connection task runs, so HEADERS and DATA leave in one flush; h2
            // holds them until the stream's window allows, which the caller keeps small.
            send_stream
                .send_data(early, false)
                .map_err(TunnelError::from_stream)?;
        }
        let response = response.await.map_err(|e| {
            if e.is_go_away() {
                self.shared.going_away.store(true, Ordering::Release);
            }
            // Refused (RFC 9113 §8.7), or cut by a graceful GOAWAY that did not cover it: the peer
            // never processed the stream; like a connection that takes no new streams.
            let unprocessed = e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR));
            if unprocessed {
                TunnelError::Closed
            } else {
                TunnelError::from_stream(e)
            }
        })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(TunnelError::Denied),
            StatusCode::SERVICE_UNAVAILABLE => return Err(TunnelError::Unreachable),
            StatusCode::BAD_REQUEST => return Err(TunnelError::BadRequest),
            other => return Err(TunnelError::Status(other.as_u16())),
        }
        Ok(HboneStream {
            send: send_stream,
            recv: response.into_body(),
            pending: Bytes::new(),
            write_closed: false,
            target,
            _slot: slot,
        })
    }

    /// A failure to even open a stream means the connection takes no more: the pool must skip it.
    fn unusable(&self, e: h2::Error) -> TunnelError {
        self.shared.going_away.store(true, Ordering::Release);
        tracing::debug!(error = %e, "HBONE connection refuses new streams");
        TunnelError::Closed
    }

    /// Whether new streams may be opened: the connection is up and the peer has not said GOAWAY.
    pub fn is_ready(&self) -> bool {
        !self.shared.going_away.load(Ordering::Acquire) && !self.is_closed()
    }

    /// Whether the connection ended (its driver task finished).
    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Resolves once the connection ended.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        // An error means the sender is gone, which only happens with the client itself: ended.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Streams currently open on this connection (including ones a pool reserved and is opening).
    pub fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// The peer's limit on concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub fn peer_max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Whether two clients are clones of the same connection.
    pub fn same_connection(&self, other: &HboneClient) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// A number identifying the connection while it lives (for logs).
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    pub(crate) fn reserve_slot(&self) -> StreamSlot {
        self.shared.active.fetch_add(1, Ordering::AcqRel);
        StreamSlot {
            shared: self.shared.clone(),
        }
    }

    /// Since when the connection has had no streams; `None` while it has some.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.active_streams() > 0 {
            return None;
        }
        Some(match self.shared.idle_since.lock() {
            Ok(t) => *t,
            Err(poisoned) => *poisoned.into_inner(),
        })
    }
}

fn connect_request(
    target: SocketAddr,
    forwarded_for: SocketAddr,
) -> Result<Request<()>, TunnelError> {
    let authority = format_authority(target);
    let uri = Uri::try_from(authority.as_str())
        .map_err(|e| TunnelError::InvalidTarget(format!("{authority}: {e}")))?;
    let forwarded = HeaderValue::try_from(format_forwarded(forwarded_for))
        .map_err(|e| TunnelError::InvalidTarget(format!("forwarded {forwarded_for}: {e}")))?;
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = uri;
    request.headers_mut().insert(FORWARDED, forwarded);
    Ok(request)
}

/// One stream's share of a connection's capacity, held from reservation (pool) to the stream's end.
pub struct StreamSlot {
    shared: Arc<Shared>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.shared.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut idle = match self.shared.idle_since.lock() {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            };
            *idle = Instant::now();
        }
    }
}

/// An established CONNECT stream: a byte stream to the target through the peer.
///
/// Use it either as `AsyncRead + AsyncWrite` (`shutdown()` sends END_STREAM; dropping it before both
/// ends finished resets the stream) or hand it to [`HboneStream::relay`] to splice it with a local
/// socket.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read; their flow-control capacity is released as they are read.
    pending: Bytes,
    write_closed: bool,
    target: SocketAddr,
    _slot: StreamSlot,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("target", &self.target)
            .field("stream_id", &self.send.stream_id().as_u32())
            .finish()
    }
}

impl HboneStream {
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Relays between this stream and `io` until both directions ended (see
    /// [`super::copy_bidirectional`]); `stats` counts bytes as they flow. The stream's slot on its
    /// connection is held until the relay ends.
    pub fn relay<T: LocalStream>(self, io: T, stats: Arc<CopyStats>) -> Relay<T, StreamSlot> {
        Relay::new(self.send, self.recv, io, stats, self.pending, self._slot)
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        this.recv
            .flow_control()
            .release_capacity(n)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream already shut down for writing",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Reserving before sending keeps h2's buffer bounded; send_data alone would buffer anything.
        this.send.reserve_capacity(buf.len().min(CHUNK));
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Accepted data is in h2's queue; the connection task writes it out as flow control allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
