//! eBPF capture: loads Ferry's programs once per node (or re-opens the pinned state an earlier agent
//! left), enrolls pods, and recovers the original destination of captured connects.
//!
//! Everything the kernel needs to keep capturing lives in bpffs under the node's `bpffs_root`:
//! `maps/` (pinned maps) and `links/` (pinned links). An agent that exits — cleanly or by SIGKILL —
//! detaches nothing; only [`uninstall`] and un-enrolling a pod remove state. While no agent runs, an
//! enrolled pod's connects are refused (nobody listens where they are steered) and inbound connections
//! to it are dropped (its `sk_lookup` finds no agent socket): capture fails closed.
mod bpf;
mod btf;
mod link;
mod pod;
pub mod splice;

pub use bpf::{Counters, DeliveryGuard, uninstall};
pub use pod::{EnrolledPod, PodAddrs, PodListeners};

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    path::PathBuf,
};

use ferry_common::{FAMILY_V4, FAMILY_V6, RawAddr};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {message}")]
    Bpf { what: String, message: String },
    #[error(
        "{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` (or point bpffs_root at one)"
    )]
    NoBpffs { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory: {hint}")]
    NotCgroup2 { path: PathBuf, hint: &'static str },
    #[error(
        "pinned maps under {path} have layout version {found}, this agent uses {ours}: run `ferry uninstall` first"
    )]
    LayoutMismatch {
        path: PathBuf,
        found: u32,
        ours: u32,
    },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this agent uses {ours:?}: run `ferry uninstall` first"
    )]
    PinnedLayout {
        path: PathBuf,
        found: (u32, u32),
        ours: (u32, u32),
    },
    #[error("listeners passed over for the pod of netns {netns}: {message}")]
    Inherited { netns: PathBuf, message: String },
    #[error("this agent was built without eBPF (the `ebpf` cargo feature is off)")]
    NotBuilt,
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

impl CaptureError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub(crate) fn bpf<E: std::error::Error>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |e| {
            // aya's errors keep the kernel's errno in their source chain: show all of it.
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            Self::Bpf { what, message }
        }
    }
}

pub use bpf::Capture;

/// The kernel-side form of a socket address, as the capture programs store it.
pub(crate) fn raw_addr(addr: SocketAddr) -> RawAddr {
    match addr {
        SocketAddr::V4(a) => RawAddr {
            addr: [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0],
            port: a.port(),
            family: FAMILY_V4,
        },
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            RawAddr {
                addr: [w(0), w(4), w(8), w(12)],
                port: a.port(),
                family: FAMILY_V6,
            }
        }
    }
}

/// The inverse of [`raw_addr`]; an IPv4-mapped IPv6 destination comes back as IPv4, which is where the
/// agent has to connect.
pub(crate) fn socket_addr(raw: &RawAddr) -> Option<SocketAddr> {
    match raw.family {
        FAMILY_V4 => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(raw.addr[0].to_ne_bytes())),
            raw.port,
        )),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in raw.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let ip = Ipv6Addr::from(o);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), raw.port),
                None => SocketAddr::V6(SocketAddrV6::new(ip, raw.port, 0, 0)),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_addresses_round_trip_in_network_order() {
        let v4: SocketAddr = "198.51.100.7:8080".parse().unwrap();
        let raw = raw_addr(v4);
        // The kernel stores IPv4 in network order: the first byte in memory is the first octet.
        assert_eq!(raw.addr[0].to_ne_bytes(), [198, 51, 100, 7]);
        assert_eq!(socket_addr(&raw), Some(v4));
        let v6: SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        assert_eq!(socket_addr(&raw_addr(v6)), Some(v6));
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        assert_eq!(
            socket_addr(&raw_addr(mapped)),
            Some("192.0.2.1:80".parse().unwrap())
        );
        assert_eq!(socket_addr(&RawAddr { family: 99, ..raw }), None);
    }
}
