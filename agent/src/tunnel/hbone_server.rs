//! The server end of HBONE: accepts CONNECT streams of one inbound connection and relays each to the
//! upstream its [`ConnectHandler`] opens.
use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use tokio::task::JoinSet;

use super::copy::{CopyOutcome, CopyStats, LocalStream, Relay, copy_bidirectional};
use super::settings::keepalive;
use super::wire::{AuthorityError, FORWARDED, parse_authority, parse_forwarded};
use super::{AsyncIo, H2Settings, Keepalive, TunnelError};
use crate::config::HboneLimits;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A CONNECT request that passed validation.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The `:authority`: the workload address the client wants to reach.
    pub target: SocketAddr,
    /// The original client address from the `forwarded` header, when present and well-formed.
    pub forwarded_for: Option<SocketAddr>,
    /// All regular request headers (`baggage`, `traceparent`, ...).
    pub headers: HeaderMap,
}

/// How a handler refuses a CONNECT; each maps to the status ztunnel answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// 401: authorization policy denies the connection.
    #[error("denied (401)")]
    Denied,
    /// 503: the target cannot be reached (connect failed, or it is one of the proxy's own ports).
    #[error("target unreachable (503)")]
    Unreachable,
    /// 400: the request is not acceptable (e.g. a target that is not a local workload).
    #[error("bad request (400)")]
    BadRequest,
}

impl Reject {
    pub fn status(self) -> StatusCode {
        match self {
            Reject::Denied => StatusCode::UNAUTHORIZED,
            Reject::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
            Reject::BadRequest => StatusCode::BAD_REQUEST,
        }
    }
}

type OnComplete = Box<dyn FnOnce(&Result<CopyOutcome, TunnelError>) + Send + 'static>;

/// The connection a handler opened for an accepted CONNECT, and how to report on the relay.
pub struct Upstream {
    io: Box<dyn LocalStream>,
    stats: Arc<CopyStats>,
    on_complete: Option<OnComplete>,
}

impl Upstream {
    pub fn new(io: impl LocalStream) -> Self {
        Upstream {
            io: Box::new(io),
            stats: Arc::new(CopyStats::new()),
            on_complete: None,
        }
    }

    /// Counters the relay updates while it runs (keep a clone for metrics).
    pub fn with_stats(mut self, stats: Arc<CopyStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Called once the relay ended, with its outcome (access log). On error, the stats hold the counts.
    pub fn on_complete(
        mut self,
        f: impl FnOnce(&Result<CopyOutcome, TunnelError>) + Send + 'static,
    ) -> Self {
        self.on_complete = Some(Box::new(f));
        self
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("stats", &self.stats)
            .finish()
    }
}

/// Decides each CONNECT: authorize, connect to the target, or refuse. A handler is typically built per
/// inbound connection, capturing the peer's verified identity and the local address.
///
/// Any `Fn(ConnectRequest) -> impl Future<Output = Result<Upstream, Reject>>` is a handler.
pub trait ConnectHandler: Send + Sync + 'static {
    fn connect(&self, request: ConnectRequest) -> BoxFuture<Result<Upstream, Reject>>;
}

impl<F, Fut> ConnectHandler for F
where
    F: Fn(ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Upstream, Reject>> + Send + 'static,
{
    fn connect(&self, request: ConnectRequest) -> BoxFuture<Result<Upstream, Reject>> {
        Box::pin(self(request))
    }
}

/// Settings of the inbound side.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub h2: H2Settings,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (ztunnel: 200).
    pub max_concurrent_streams: u32,
    /// A peer that connects and never completes the HTTP/2 preface is dropped after this.
    pub handshake_timeout: Duration,
    /// A connection whose first CONNECT has not arrived this long after it started is dropped: a peer
    /// that opens connections and never asks for anything (or never finishes its HEADERS) holds
    /// nothing for long. Later idle periods are normal (pooled connections wait for their next stream).
    pub request_timeout: Duration,
    pub keepalive: Option<Keepalive>,
}

impl ServerConfig {
    /// The inbound settings the node config's `hbone` limits ask for.
    pub fn from_limits(limits: &HboneLimits) -> Self {
        ServerConfig {
            h2: H2Settings {
                initial_stream_window: limits.stream_window,
                initial_connection_window: limits.connection_window,
                max_header_list_size: limits.max_header_list_size,
                ..H2Settings::default()
            },
            max_concurrent_streams: limits.max_streams_per_connection,
            handshake_timeout: limits.handshake_timeout,
            request_timeout: limits.request_timeout,
            keepalive: Some(Keepalive::default()),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            h2: H2Settings::default(),
            max_concurrent_streams: 200,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            keepalive: Some(Keepalive::default()),
        }
    }
}

/// Serves HBONE connections with one handler and configuration.
pub struct HboneServer<H> {
    handler: Arc<H>,
    config: Arc<ServerConfig>,
}

impl<H> Clone for HboneServer<H> {
    fn clone(&self) -> Self {
        HboneServer {
            handler: self.handler.clone(),
            config: self.config.clone(),
        }
    }
}

impl<H: ConnectHandler> HboneServer<H> {
    pub fn new(handler: Arc<H>, config: ServerConfig) -> Self {
        HboneServer {
            handler,
            config: Arc::new(config),
        }
    }

    /// Serves one inbound connection until the peer closes it (`Ok`: GOAWAY, or TCP closed between
    /// frames) or it fails (`Err`: not HTTP/2, protocol error, keepalive timeout, I/O error). Streams
    /// cut by the end of the connection fail individually (see [`Upstream::on_complete`]). `expected_local_ip` is the address the connection
    /// arrived on: a CONNECT to another IP gets 400, as in ztunnel. Dropping the future drops the
    /// connection and every relay of it.
    pub async fn serve_connection<T: AsyncIo>(
        &self,
        io: T,
        expected_local_ip: Option<IpAddr>,
    ) -> Result<(), TunnelError> {
        self.serve_connection_until(io, expected_local_ip, std::future::pending())
            .await
    }

    /// [`Self::serve_connection`], and once `drain` resolves: GOAWAY, so the peer opens new streams on
    /// another connection while the streams open here run to their end.
    pub async fn serve_connection_until<T: AsyncIo>(
        &self,
        io: T,
        expected_local_ip: Option<IpAddr>,
        drain: impl std::future::Future<Output = ()>,
    ) -> Result<(), TunnelError> {
        let config = &self.config;
        let first_request = tokio::time::sleep(config.request_timeout);
        tokio::pin!(first_request);
        let mut requested = false;
        let s = &config.h2;
        let handshake = h2::server::Builder::new()
            .initial_window_size(s.initial_stream_window)
            .initial_connection_window_size(s.initial_connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .max_send_buffer_size(s.max_send_buffer_size)
            .max_concurrent_streams(config.max_concurrent_streams)
            .handshake::<_, Bytes>(io);
        let mut connection = tokio::time::timeout(config.handshake_timeout, handshake)
            .await
            .map_err(|_| TunnelError::HandshakeTimeout(config.handshake_timeout))?
            .map_err(TunnelError::Handshake)?;
        let ping_pong = connection.ping_pong();
        let keepalive_fut = async {
            match (ping_pong, config.keepalive) {
                (Some(pp), Some(cfg)) => keepalive(pp, cfg).await,
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(keepalive_fut);
        tokio::pin!(drain);
        let mut goaway_sent = false;
        // Relays live in this set so that they end with the connection (dropping the set aborts them).
        let mut relays = JoinSet::new();
        loop {
            tokio::select! {
                next = connection.accept() => match next {
                    None => break,
                    Some(Err(e)) => return Err(TunnelError::Connection(e)),
                    Some(Ok((request, respond))) => {
                        requested = true;
                        relays.spawn(serve_stream(
                            request,
                            respond,
                            self.handler.clone(),
                            expected_local_ip,
                        ));
                    }
                },
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
                () = &mut drain, if !goaway_sent => {
                    goaway_sent = true;
                    connection.graceful_shutdown();
                }
                _ = &mut first_request, if !requested => {
                    return Err(TunnelError::RequestTimeout(config.request_timeout));
                }
                timeout = &mut keepalive_fut => {
                    return Err(TunnelError::KeepaliveTimeout(timeout));
                }
            }
        }
        // The peer closed the connection; relays still running have lost their streams and end soon.
        while relays.join_next().await.is_some() {}
        Ok(())
    }
}

/// Serves one inbound connection with the default configuration; see
/// [`HboneServer::serve_connection`].
pub async fn serve_connection<T: AsyncIo, H: ConnectHandler>(
    io: T,
    handler: Arc<H>,
    expected_local_ip: Option<IpAddr>,
) -> Result<(), TunnelError> {
    HboneServer::new(handler, ServerConfig::default())
        .serve_connection(io, expected_local_ip)
        .await
}

/// Why a request is answered 400 before reaching the handler.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(Method),
    #[error("CONNECT with :scheme or :path")]
    SchemeOrPath,
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("authority IP {target} is not the local address {expected}")]
    NotLocal { target: IpAddr, expected: IpAddr },
}

/// Checks the head of an inbound request (what a peer sent in its HEADERS) and reads the CONNECT out
/// of it. Pure: no I/O, so the fuzzer drives it with arbitrary heads.
pub fn validate_connect(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    expected_local_ip: Option<IpAddr>,
) -> Result<ConnectRequest, BadRequest> {
    if method != Method::CONNECT {
        return Err(BadRequest::Method(method.clone()));
    }
    // h2 already resets plain CONNECTs carrying these (RFC 9113 §8.5); this covers what gets through.
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(BadRequest::SchemeOrPath);
    }
    let target = parse_authority(uri.authority().map(|a| a.as_str()))?;
    if let Some(expected) = expected_local_ip
        && target.ip().to_canonical() != expected.to_canonical()
    {
        return Err(BadRequest::NotLocal {
            target: target.ip(),
            expected,
        });
    }
    let forwarded_for = headers
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded);
    Ok(ConnectRequest {
        target,
        forwarded_for,
        headers: headers.clone(),
    })
}

fn respond_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(e) = respond.send_response(response, true) {
        tracing::debug!(error = %e, %status, "could not send HBONE response");
    }
}

/// One CONNECT stream, from its request to the end of its relay. The set-up (validation, the
/// handler's connect) runs boxed and is freed before relaying starts: only the relay's own state stays
/// allocated for the life of the connection.
fn serve_stream<H: ConnectHandler>(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    handler: Arc<H>,
    expected_local_ip: Option<IpAddr>,
) -> impl Future<Output = ()> + Send + 'static {
    let open = Box::pin(open_stream(request, respond, handler, expected_local_ip));
    async move {
        // `let else`, not `if let`: the scrutinee of an `if let` would stay in the task beside the
        // binding for as long as the relay runs.
        let Some(mut relay) = open.await else {
            return;
        };
        let result = (&mut relay.relay).await;
        relay.complete(result);
    }
}

/// An accepted stream being relayed to its upstream.
struct StreamRelay {
    relay: Relay<Box<dyn LocalStream>>,
    target: SocketAddr,
    on_complete: Option<OnComplete>,
}

impl StreamRelay {
    fn complete(self, result: Result<CopyOutcome, TunnelError>) {
        report(self.target, self.on_complete, result);
    }
}

/// Validates the request, asks the handler, answers; the relay to run when the answer is 200.
async fn open_stream<H: ConnectHandler>(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: Arc<H>,
    expected_local_ip: Option<IpAddr>,
) -> Option<StreamRelay> {
    let connect = match validate_connect(
        request.method(),
        request.uri(),
        request.headers(),
        expected_local_ip,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "HBONE request rejected");
            respond_status(&mut respond, StatusCode::BAD_REQUEST);
            return None;
        }
    };
    let target = connect.target;
    // A client that gives up (RST_STREAM) while the handler is still connecting cancels the handler.
    let decision = tokio::select! {
        d = handler.connect(connect) => d,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(%target, "HBONE stream reset before the upstream was ready");
            return None;
        }
    };
    let upstream = match decision {
        Ok(u) => u,
        Err(reject) => {
            tracing::debug!(%target, %reject, "HBONE CONNECT refused");
            respond_status(&mut respond, reject.status());
            return None;
        }
    };
    let Upstream {
        io,
        stats,
        on_complete,
    } = upstream;
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            report(target, on_complete, Err(TunnelError::from_stream(e)));
            return None;
        }
    };
    Some(StreamRelay {
        relay: copy_bidirectional(send, request.into_body(), io, stats),
        target,
        on_complete,
    })
}

fn report(
    target: SocketAddr,
    on_complete: Option<OnComplete>,
    result: Result<CopyOutcome, TunnelError>,
) {
    if let Err(e) = &result {
        tracing::debug!(%target, error = %e, "HBONE relay ended with an error");
    }
    if let Some(f) = on_complete {
        f(&result);
    }
}
