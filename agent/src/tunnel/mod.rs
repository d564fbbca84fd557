//! HBONE: TCP connections carried as HTTP/2 CONNECT streams between node agents (port 15008), the wire
//! format of Istio ambient's ztunnel.
//!
//! Everything here is generic over the transport (`AsyncRead + AsyncWrite + Unpin + Send + 'static`): the
//! agent passes mutual-TLS streams, tests pass loopback TCP or in-memory pipes.
//!
//! - [`hbone_client`]: one HTTP/2 connection to a peer agent, opening CONNECT streams ([`HboneStream`]).
//! - [`hbone_server`]: serves the CONNECT streams of one inbound connection through a [`ConnectHandler`].
//! - [`copy`]: the bidirectional byte relay between an HBONE stream and a TCP-like stream.
//! - [`pool`]: reuse of client connections per key, bounded streams per connection.
//!
//! Inbound (port 15008, after the TLS accept): build a handler for the connection, typically capturing
//! the peer's verified identity, and serve it:
//!
//! ```no_run
//! # use std::{net::SocketAddr, sync::Arc};
//! # use ferry::tunnel::{ConnectRequest, HboneServer, Reject, ServerConfig, Upstream};
//! # async fn inbound(tls: tokio::net::TcpStream, local: SocketAddr) -> Result<(), ferry::tunnel::TunnelError> {
//! let handler = Arc::new(|req: ConnectRequest| async move {
//!     // Authorization (401) would be decided here, from the peer identity and `req`.
//!     let upstream = tokio::net::TcpStream::connect(req.target)
//!         .await
//!         .map_err(|_| Reject::Unreachable)?;
//!     Ok(Upstream::new(upstream).on_complete(|outcome| tracing::info!(?outcome, "closed")))
//! });
//! HboneServer::new(handler, ServerConfig::default())
//!     .serve_connection(tls, Some(local.ip()))
//!     .await
//! # }
//! ```
//!
//! Outbound (a captured app connection): take a stream slot from the pool, then relay.
//!
//! ```no_run
//! # use std::net::SocketAddr;
//! # use ferry::tunnel::{CopyStats, HboneClient, Pool, PoolConfig, TunnelError};
//! # async fn outbound(pool: Pool<(String, SocketAddr)>, app: tokio::net::TcpStream,
//! #     src: SocketAddr, dst: SocketAddr, cert_generation: u64) -> Result<(), TunnelError> {
//! let key = ("default/sleep".to_owned(), dst);
//! let client = pool
//!     .get_or_connect(key, cert_generation, || async move {
//!         let tcp = tokio::net::TcpStream::connect((dst.ip(), 15008)).await?;
//!         // The TLS handshake (client cert of `cert_generation`) goes here.
//!         HboneClient::handshake(tcp).await
//!     })
//!     .await?;
//! let stream = client.connect(dst, src).await?;
//! let stats = std::sync::Arc::new(CopyStats::new());
//! let outcome = stream.relay(app, stats.clone()).await?;
//! tracing::info!(sent = outcome.sent, received = outcome.received, "closed");
//! # Ok(())
//! # }
//! ```
pub mod conn;
pub mod conns;
pub mod copy;
mod error;
pub mod hbone_client;
pub mod hbone_server;
pub mod inbound;
pub mod kill;
pub mod limits;
pub mod mesh;
pub mod outbound;
pub mod pool;
mod settings;
pub mod splice;
pub mod wire;

pub use copy::{CopyOutcome, CopyStats, LocalStream, copy_bidirectional};
pub use error::TunnelError;
pub use hbone_client::{ClientConfig, HboneClient, HboneStream};
pub use hbone_server::{
    BadRequest, BoxFuture, ConnectHandler, ConnectRequest, HboneServer, Reject, ServerConfig,
    Upstream, serve_connection, validate_connect,
};
pub use mesh::{Mesh, PodCtx};
pub use pool::{Pool, PoolConfig, PoolStats, PooledClient};
pub use settings::{H2Settings, Keepalive};

use tokio::io::{AsyncRead, AsyncWrite};

/// Any byte stream HBONE can run over, or relay to: TLS streams, TCP streams, in-memory pipes.
pub trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncIo for T {}

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::TcpStream;

use crate::{capture::Capture, netns::Netns};

/// Closes with a reset rather than a FIN: the peer must not mistake a refusal for an empty reply.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// How long a connect to an app or an upstream may take before the client is reset.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect_socket(sock: socket2::Socket, dst: SocketAddr) -> io::Result<TcpStream> {
    let std_stream: std::net::TcpStream = sock.into();
    let connect = tokio::net::TcpSocket::from_std_stream(std_stream).connect(dst);
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            )
        })?
}

/// Connects from inside a pod's netns, so the network sees the pod's address as the source.
pub async fn connect_in(netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
    connect_socket(netns.tcp_socket(dst.is_ipv6())?, dst).await
}

/// Delivers to an app inside its pod's netns, from `src` (the original client's address, when the pod
/// is prepared for transparent deliveries) or else from the pod's own address. The connection is
/// announced to `sk_lookup` by its addresses so it reaches the app instead of being steered back.
pub async fn deliver(
    capture: &Capture,
    pod: &PodCtx,
    src: Option<IpAddr>,
    dst: SocketAddr,
) -> io::Result<TcpStream> {
    let sock = match src {
        Some(src) if pod.transparent && src.is_ipv4() == dst.is_ipv4() && src != dst.ip() => {
            crate::netns::route::transparent_socket(
                &pod.netns,
                src,
                crate::netns::route::DEFAULT_MARK,
            )?
        }
        _ => {
            let sock = pod.netns.tcp_socket(dst.is_ipv6())?;
            // Binding first fixes the source port, which the announcement needs.
            sock.bind(&SocketAddr::new(dst.ip(), 0).into())?;
            sock
        }
    };
    let src = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("delivery socket has no IP address"))?;
    let _announced = capture
        .announce_delivery(src, dst)
        .map_err(io::Error::other)?;
    let std_stream: std::net::TcpStream = sock.into();
    tokio::net::TcpSocket::from_std_stream(std_stream)
        .connect(dst)
        .await
}
