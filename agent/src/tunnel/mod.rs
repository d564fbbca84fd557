//! HBONE: TCP connections carried as HTTP/2 CONNECT streams between node agents (port 15008), the wire
//! format of Istio ambient's ztunnel (see `/work/shared/hbone.md`).
//!
//! Everything here is generic over the transport (`AsyncRead + AsyncWrite + Unpin + Send + 'static`): the
//! agent passes mutual-TLS streams, tests pass loopback TCP or in-memory pipes.
//!
//! - [`hbone_client`]: one HTTP/2 connection to a peer agent, opening CONNECT streams ([`HboneStream`]).
//! - [`hbone_server`]: serves the CONNECT streams of one inbound connection through a [`ConnectHandler`].
//! - [`copy`]: the bidirectional byte relay between an HBONE stream and a TCP-like stream.
//! - [`pool`]: reuse of client connections per key, bounded streams per connection.
pub mod copy;
mod error;
pub mod hbone_client;
pub mod hbone_server;
pub mod pool;
mod settings;
pub mod wire;

pub use copy::{CopyOutcome, CopyStats, copy_bidirectional};
pub use error::TunnelError;
pub use hbone_client::{ClientConfig, HboneClient, HboneStream};
pub use hbone_server::{
    BoxFuture, ConnectHandler, ConnectRequest, HboneServer, Reject, ServerConfig, Upstream,
    serve_connection,
};
pub use pool::{Pool, PoolConfig, PoolStats, PooledClient};
pub use settings::{H2Settings, Keepalive};

use tokio::io::{AsyncRead, AsyncWrite};

/// Any byte stream HBONE can run over, or relay to: TLS streams, TCP streams, in-memory pipes.
pub trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncIo for T {}
