//! State shared by Ferry's eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]`, padded explicitly and free of implicit holes, because the kernel
//! compares map keys byte by byte: an uninitialised padding byte would make two equal keys differ.
//! Map layouts are versioned through [`MAP_LAYOUT_VERSION`], stored in the pinned `FERRY_META` map, so an
//! agent can tell whether the pinned state an older agent left matches its own layout.
#![no_std]

/// Bumped whenever a pinned map's key or value layout changes.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Entries of each of the fast path's maps (`FERRY_SPLICE`, `FERRY_SPLICE_PEERS`,
/// `FERRY_SPLICE_NEXT`): one per socket, two per joined connection.
pub const SPLICE_SOCKETS: u32 = 65536;

/// The most pairs the agent joins at once (its default, and the bound of `capture.fast_path_max_pairs`):
/// a quarter of the maps' entries (two per pair), so the LRU map of peer entries never has to evict a
/// live one — which would lose the counts the relay needs — even beside a predecessor's entries
/// during a handoff.
pub const SPLICE_MAX_PAIRS: u32 = SPLICE_SOCKETS / 4;

/// Address family tags carried in keys (the kernel's `AF_INET` / `AF_INET6`).
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// Socket kinds the agent registers per pod network namespace in `FERRY_SOCKETS`.
pub const SOCK_KIND_INBOUND: u32 = 0;
pub const SOCK_KIND_HBONE: u32 = 1;

/// Names of the maps, as pinned under `<bpffs root>/maps/`.
pub mod maps {
    pub const META: &str = "FERRY_META";
    pub const SETTINGS: &str = "FERRY_SETTINGS";
    pub const ENROLLED: &str = "FERRY_ENROLLED";
    pub const ORIG_BY_COOKIE: &str = "FERRY_ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "FERRY_ORIG_BY_TUPLE";
    pub const EXCLUDE_PORTS: &str = "FERRY_EXCLUDE_PORTS";
    pub const INBOUND_EXCLUDE_PORTS: &str = "FERRY_IN_EXCLUDE_PORTS";
    pub const EXCLUDE_V4: &str = "FERRY_EXCLUDE_V4";
    pub const EXCLUDE_V6: &str = "FERRY_EXCLUDE_V6";
    pub const SOCKETS: &str = "FERRY_SOCKETS";
    pub const DELIVERIES: &str = "FERRY_DELIVERIES";
    pub const COUNTERS: &str = "FERRY_COUNTERS";
    pub const SPLICE: &str = "FERRY_SPLICE";
    pub const SPLICE_PEERS: &str = "FERRY_SPLICE_PEERS";
    pub const SPLICE_COUNTERS: &str = "FERRY_SPLICE_COUNTERS";
    pub const SPLICE_NEXT: &str = "FERRY_SPLICE_NEXT";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "ferry_connect4";
    pub const CONNECT6: &str = "ferry_connect6";
    pub const GETPEERNAME4: &str = "ferry_getpeername4";
    pub const GETPEERNAME6: &str = "ferry_getpeername6";
    pub const SOCKOPS: &str = "ferry_sockops_established";
    pub const SK_LOOKUP: &str = "ferry_sk_lookup";
    pub const SPLICE_VERDICT: &str = "ferry_splice_verdict";
}

/// Node-wide settings the agent writes once into `FERRY_SETTINGS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Port of the agent's outbound listener on loopback inside every enrolled pod netns.
    pub outbound_port: u16,
    /// Port whose inbound connections go to the HBONE socket rather than the plaintext one.
    pub hbone_port: u16,
    pub _pad: u32,
}

/// Value of `FERRY_ENROLLED`, keyed by the pod's cgroup id (the inode of its cgroup v2 directory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
}

/// An IP address in network byte order, IPv4 in the first word. `family` says which.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawAddr {
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u16,
    pub family: u16,
}

/// Original destination of a captured connect, as the app dialled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Netns of the socket that connected: keys the tuple map so pods that reuse addresses never collide.
    pub netns_cookie: u64,
    pub dst: RawAddr,
    pub _pad: u32,
}

/// Key of `FERRY_ORIG_BY_TUPLE`: the captured socket's local address within its netns, which is the
/// peer address the agent sees on `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    pub local: RawAddr,
    pub _pad: u32,
}

/// Key of `FERRY_SOCKETS`: which of the agent's listeners serves a pod address.
///
/// Keyed by the pod's IP (network order, IPv4 in the first word) because `sk_lookup` programs cannot
/// learn their netns (`bpf_get_netns_cookie` is not available to them), and a node's pod IPs are
/// unique on that node; each node has its own maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub addr: [u32; 4],
    pub kind: u32,
    pub family: u32,
}

/// Key of `FERRY_DELIVERIES`: a connection the agent itself is opening to an app inside a pod netns,
/// which `sk_lookup` must let through. A local connection to the pod's own IP is seen by `sk_lookup` with
/// the IP's device (not loopback) as its ingress, so the agent announces each delivery's addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub src: RawAddr,
    pub dst: RawAddr,
}

/// Value of `FERRY_SPLICE_PEERS`, keyed by the socket cookie of one of the agent's two sockets of a
/// same-node connection joined in the kernel (the fast path): where its received bytes go, and how many
/// went there without crossing userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// Cookie of the other socket, its key in `FERRY_SPLICE`.
    pub peer: u64,
    /// Bytes received on this socket and sent out of the peer socket by the kernel.
    pub redirected: u64,
    /// Zero while the kernel carries this socket's bytes; once the verdict program sends one buffer to
    /// userspace, why (one of [`pass_reason`]), and from then on every byte of this socket goes there,
    /// so bytes never overtake each other between the two paths.
    pub passed: u32,
    /// Buffers whose head repeated bytes the verdict had already carried (a retransmission that
    /// overlaps received bytes, which TCP queues whole) and which it cut before carrying them on.
    pub repeats: u32,
}

/// Why a joined socket's bytes went to userspace ([`SplicePeer::passed`]).
pub mod pass_reason {
    /// The peer socket was not, or no longer, in `FERRY_SPLICE`.
    pub const REDIRECT_FAILED: u32 = 1;
    /// The buffer's sequence number or the socket's `copied_seq` could not be read.
    pub const SEQ_UNREADABLE: u32 = 2;
    /// The buffer starts after the socket's `copied_seq`: a gap the guard does not understand.
    pub const SEQ_AHEAD: u32 = 3;
    /// The buffer repeats more bytes than the verdict cuts (about 1 MiB), or all of itself.
    pub const REPEAT_TOO_LONG: u32 = 4;
    /// `bpf_skb_adjust_room` refused to cut the repeated head.
    pub const CUT_FAILED: u32 = 5;
    /// The agent sent both sockets to userspace (joining failed halfway).
    pub const AGENT: u32 = 6;

    /// Whether a socket that passed for `reason` may hand userspace bytes it had handed on before
    /// (a repeated head left uncut, or one that could not be measured): relaying them would
    /// deliver them twice.
    pub fn may_repeat(reason: u32) -> bool {
        !matches!(reason, 0 | REDIRECT_FAILED | AGENT)
    }

    /// A reason's name, for logs.
    pub fn name(reason: u32) -> &'static str {
        match reason {
            0 => "none",
            REDIRECT_FAILED => "the peer socket was not in the sockhash",
            SEQ_UNREADABLE => "sequence numbers unreadable",
            SEQ_AHEAD => "the buffer started after copied_seq",
            REPEAT_TOO_LONG => "the buffer repeated more than the verdict cuts, or all of itself",
            CUT_FAILED => "cutting the repeated head failed",
            AGENT => "joining failed halfway",
            _ => "unknown",
        }
    }
}

/// Indices of the per-CPU counters in `FERRY_COUNTERS`.
pub mod counters {
    pub const OUTBOUND_CAPTURED: u32 = 0;
    pub const OUTBOUND_BYPASSED: u32 = 1;
    pub const INBOUND_STEERED: u32 = 2;
    pub const INBOUND_DROPPED_NO_AGENT: u32 = 3;
    pub const INBOUND_BYPASSED: u32 = 4;
    pub const ORIG_DST_RECORDED: u32 = 5;
    pub const INBOUND_DELIVERY_PASSED: u32 = 6;
    pub const COUNT: u32 = 7;
    pub const NAMES: [&str; COUNT as usize] = [
        "outbound_captured",
        "outbound_bypassed",
        "inbound_steered",
        "inbound_dropped_no_agent",
        "inbound_bypassed",
        "orig_dst_recorded",
        "inbound_delivery_passed",
    ];
}

/// Indices of the fast path's per-CPU counters in `FERRY_SPLICE_COUNTERS`: a map of their own, so an
/// agent re-opening the pinned `FERRY_COUNTERS` of an older agent finds it the size it expects.
pub mod splice_counters {
    /// Socket buffers the fast path sent on in the kernel.
    pub const REDIRECTED: u32 = 0;
    /// Fast-path sockets that fell back to userspace (the peer socket was gone).
    pub const PASSED: u32 = 1;
    pub const COUNT: u32 = 2;
    pub const NAMES: [&str; COUNT as usize] = ["splice_redirected", "splice_passed"];
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are plain-old-data #[repr(C)] structs without implicit padding.
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for PodEntry {}
    unsafe impl aya::Pod for RawAddr {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for DeliveryKey {}
    unsafe impl aya::Pod for SplicePeer {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel sees these sizes; a hole would make keys compare unequal.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Settings>(), 8);
        assert_eq!(size_of::<PodEntry>(), 8);
        assert_eq!(size_of::<RawAddr>(), 20);
        assert_eq!(size_of::<OrigDst>(), 32);
        assert_eq!(size_of::<TupleKey>(), 32);
        assert_eq!(size_of::<SocketKey>(), 24);
        assert_eq!(size_of::<DeliveryKey>(), 40);
        assert_eq!(size_of::<SplicePeer>(), 24);
    }
}
