//! Transparent deliveries (placeholder until policy routing lands): see `prepare_transparent`.
use std::{io, net::IpAddr};

use super::Netns;

/// The mark of the agent's delivery sockets; the pod netns routes replies to marked flows locally.
pub const DELIVERY_MARK: u32 = 0x539;
/// The routing table of that local route.
pub const DELIVERY_TABLE: u32 = 100;

#[derive(Debug, thiserror::Error)]
#[error("transparent delivery is not set up yet")]
pub struct RouteError;

pub fn prepare_transparent(_ns: &Netns, _mark: u32, _table: u32) -> Result<(), RouteError> {
    Err(RouteError)
}

pub fn transparent_socket(ns: &Netns, src: IpAddr, mark: u32) -> io::Result<socket2::Socket> {
    let sock = ns.tcp_socket(src.is_ipv6())?;
    if src.is_ipv6() {
        sock.set_ip_transparent_v6(true)?;
    } else {
        sock.set_ip_transparent_v4(true)?;
    }
    sock.set_mark(mark)?;
    sock.bind(&std::net::SocketAddr::new(src, 0).into())?;
    Ok(sock)
}
