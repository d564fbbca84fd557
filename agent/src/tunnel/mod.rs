//! The node tunnel: what happens to a captured connection between the pod's socket and its peer.
pub mod conn;
pub mod inbound;
pub mod outbound;

use std::{io, net::SocketAddr};

use tokio::net::TcpStream;

use crate::{capture::Capture, netns::Netns};

/// A pod of this node, as the connection handlers see it.
pub struct PodCtx {
    /// `namespace/name`.
    pub name: String,
    pub netns: Netns,
}

/// Closes with a reset rather than a FIN: the peer must not mistake a refusal for an empty reply.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// Connects from inside a pod's netns, so the network sees the pod's address as the source.
pub async fn connect_in(netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = netns.tcp_socket(dst.is_ipv6())?;
    let std_stream: std::net::TcpStream = sock.into();
    tokio::net::TcpSocket::from_std_stream(std_stream)
        .connect(dst)
        .await
}

/// Delivers to an app inside its own pod netns: the connection is announced to `sk_lookup` by its
/// addresses so it reaches the app instead of being steered back to the agent.
pub async fn deliver(capture: &Capture, netns: &Netns, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = netns.tcp_socket(dst.is_ipv6())?;
    // Binding first fixes the source port, which the announcement needs.
    sock.bind(&SocketAddr::new(dst.ip(), 0).into())?;
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
