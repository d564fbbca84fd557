//! Ferry's capture programs.
//!
//! - `cgroup/connect4|6` on the node's cgroup root: a TCP connect from an enrolled pod cgroup (or any
//!   descendant) is rewritten to the agent's outbound listener on loopback inside the pod's own netns,
//!   and the original destination is kept under the socket's cookie.
//! - `sockops` (active established): moves that entry under the socket's (netns, local address), which
//!   is what the agent sees as the peer on `accept()`.
//! - `cgroup/getpeername4|6`: the app sees the address it dialled, not the agent.
//! - `sk_lookup` on each enrolled pod netns: inbound connections arriving from outside the netns go to
//!   the agent's socket for that netns; with no agent socket they are dropped (fail closed). Connections
//!   arriving on loopback (the agent's own deliveries, the pod talking to itself) pass.
//! - `sk_skb/stream_verdict` on `FERRY_SPLICE` (the same-node fast path): once the agent has authorized
//!   a same-node connection it puts its two sockets (the app's captured connection and the delivery to
//!   the destination app) into `FERRY_SPLICE`, and the bytes each receives are sent out of the other by
//!   the kernel, counted per socket in `FERRY_SPLICE_PEERS`.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, bpf_sock_addr, sk_action},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_probe_read_kernel,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use ferry_common::{
    DeliveryKey, FAMILY_V4, FAMILY_V6, OrigDst, PodEntry, RawAddr, SOCK_KIND_HBONE,
    SOCK_KIND_INBOUND, SPLICE_SOCKETS, Settings, SocketKey, SplicePeer, TupleKey, counters,
    pass_reason, splice_counters,
};

const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// Deepest cgroup level searched for an enrolled ancestor; kubelet layouts are 4–6 levels deep.
const MAX_CGROUP_DEPTH: i32 = 24;

#[map(name = "FERRY_META")]
static FERRY_META: Array<u32> = Array::pinned(1, 0);
#[map(name = "FERRY_SETTINGS")]
static FERRY_SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map(name = "FERRY_ENROLLED")]
static FERRY_ENROLLED: HashMap<u64, PodEntry> = HashMap::pinned(16384, 0);
#[map(name = "FERRY_ORIG_BY_COOKIE")]
static FERRY_ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);
#[map(name = "FERRY_ORIG_BY_TUPLE")]
static FERRY_ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::pinned(65536, 0);
#[map(name = "FERRY_EXCLUDE_PORTS")]
static FERRY_EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);
#[map(name = "FERRY_IN_EXCLUDE_PORTS")]
static FERRY_IN_EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);
#[map(name = "FERRY_EXCLUDE_V4")]
static FERRY_EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(256, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_EXCLUDE_V6")]
static FERRY_EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(256, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_SOCKETS")]
static FERRY_SOCKETS: SockHash<SocketKey> = SockHash::pinned(65536, 0);
#[map(name = "FERRY_DELIVERIES")]
static FERRY_DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(65536, 0);
#[map(name = "FERRY_SPLICE")]
static FERRY_SPLICE: SockHash<u64> = SockHash::pinned(SPLICE_SOCKETS, 0);
#[map(name = "FERRY_SPLICE_PEERS")]
static FERRY_SPLICE_PEERS: LruHashMap<u64, SplicePeer> = LruHashMap::pinned(SPLICE_SOCKETS, 0);
/// For a joined socket whose bytes went to userspace: the TCP sequence number of the next byte the
/// verdict has not passed on, so a repeated head is still cut (the kernel advances `copied_seq` of
/// such a socket only as the agent reads).
#[map(name = "FERRY_SPLICE_NEXT")]
static FERRY_SPLICE_NEXT: LruHashMap<u64, u32> = LruHashMap::pinned(SPLICE_SOCKETS, 0);
#[map(name = "FERRY_SPLICE_COUNTERS")]
static FERRY_SPLICE_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(splice_counters::COUNT, 0);
#[map(name = "FERRY_COUNTERS")]
static FERRY_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);

/// How far a counter advances per event; see the `upgrade-test-variant` feature.
const COUNT_STEP: u64 = if cfg!(feature = "upgrade-test-variant") {
    2
} else {
    1
};

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = FERRY_COUNTERS.get_ptr_mut(idx) {
        unsafe { *p += COUNT_STEP };
    }
}

#[inline(always)]
fn count_splice(idx: u32) {
    if let Some(p) = FERRY_SPLICE_COUNTERS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn settings() -> Option<Settings> {
    FERRY_SETTINGS.get(0).copied()
}

/// Whether the calling task sits in an enrolled pod cgroup or below one.
#[inline(always)]
fn in_enrolled_pod() -> bool {
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if unsafe { FERRY_ENROLLED.get(id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Context fields must be accessed as whole 32-bit words: an array copy compiles to a byte-wise memcpy
/// the verifier rejects on a context pointer.
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&sa.user_ip6[0]),
            read_volatile(&sa.user_ip6[1]),
            read_volatile(&sa.user_ip6[2]),
            read_volatile(&sa.user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, ip: [u32; 4]) {
    unsafe {
        write_volatile(&mut sa.user_ip6[0], ip[0]);
        write_volatile(&mut sa.user_ip6[1], ip[1]);
        write_volatile(&mut sa.user_ip6[2], ip[2]);
        write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
}

// The exclusion checks are real subprograms: inlined, LLVM merges two lookups' results into one
// `pointer | pointer`, which the verifier rejects.
#[inline(never)]
fn port_excluded(port: u16) -> bool {
    unsafe { FERRY_EXCLUDE_PORTS.get(port) }.is_some()
}

/// Common tail of connect4/connect6: record the original destination; the caller rewrites.
#[inline(always)]
fn record(ctx: &SockAddrContext, dst: RawAddr) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let entry = OrigDst {
        netns_cookie,
        dst,
        _pad: 0,
    };
    FERRY_ORIG_BY_COOKIE
        .insert(cookie, entry, BPF_ANY as u64)
        .is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return 1;
    }
    let ip_be = sa.user_ip4;
    let ip = u32::from_be(ip_be).to_be_bytes();
    let port = u16::from_be(sa.user_port as u16);
    if ip[0] == 127 || !in_enrolled_pod() {
        return 1;
    }
    if port_excluded(port) || v4_excluded(ip) {
        count(counters::OUTBOUND_BYPASSED);
        return 1;
    }
    let Some(s) = settings() else {
        // Enrolled but never configured: refuse rather than leak.
        return 0;
    };
    let dst = RawAddr {
        addr: [ip_be, 0, 0, 0],
        port,
        family: FAMILY_V4,
    };
    if !record(&ctx, dst) {
        return 0;
    }
    sa.user_ip4 = u32::to_be(0x7f00_0001);
    sa.user_port = u16::to_be(s.outbound_port) as u32;
    count(counters::OUTBOUND_CAPTURED);
    1
}

#[inline(never)]
fn v4_excluded(ip: [u8; 4]) -> bool {
    FERRY_EXCLUDE_V4.get(Key::new(32, ip)).is_some()
}

#[inline(never)]
fn v6_excluded(ip: [u8; 16]) -> bool {
    FERRY_EXCLUDE_V6.get(Key::new(128, ip)).is_some()
}

#[inline(always)]
fn v6_is_loopback(a: &[u32; 4]) -> bool {
    let mapped = a[0] == 0 && a[1] == 0 && u32::from_be(a[2]) == 0xffff;
    (a[0] == 0 && a[1] == 0 && a[2] == 0 && u32::from_be(a[3]) == 1)
        || (mapped && (u32::from_be(a[3]) >> 24) == 127)
}

#[inline(always)]
fn v6_bytes(a: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = u32::from_be(a[i]).to_be_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return 1;
    }
    let ip = read_ip6(sa);
    let port = u16::from_be(sa.user_port as u16);
    if v6_is_loopback(&ip) || !in_enrolled_pod() {
        return 1;
    }
    let mapped = ip[0] == 0 && ip[1] == 0 && u32::from_be(ip[2]) == 0xffff;
    let excluded_cidr = if mapped {
        v4_excluded(u32::from_be(ip[3]).to_be_bytes())
    } else {
        v6_excluded(v6_bytes(&ip))
    };
    if port_excluded(port) || excluded_cidr {
        count(counters::OUTBOUND_BYPASSED);
        return 1;
    }
    let Some(s) = settings() else {
        return 0;
    };
    let dst = RawAddr {
        addr: ip,
        port,
        family: FAMILY_V6,
    };
    if !record(&ctx, dst) {
        return 0;
    }
    write_ip6(sa, [0, 0, 0, u32::to_be(1)]);
    sa.user_port = u16::to_be(s.outbound_port) as u32;
    count(counters::OUTBOUND_CAPTURED);
    1
}

#[sock_ops]
pub fn ferry_sockops_established(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { FERRY_ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return 1;
    };
    let family = ctx.family();
    let local = if family == FAMILY_V4 as u32 {
        RawAddr {
            addr: [ctx.local_ip4(), 0, 0, 0],
            port: ctx.local_port() as u16,
            family: FAMILY_V4,
        }
    } else {
        let ops = unsafe { &*ctx.ops };
        let addr = unsafe {
            [
                read_volatile(&ops.local_ip6[0]),
                read_volatile(&ops.local_ip6[1]),
                read_volatile(&ops.local_ip6[2]),
                read_volatile(&ops.local_ip6[3]),
            ]
        };
        RawAddr {
            addr,
            port: ctx.local_port() as u16,
            family: FAMILY_V6,
        }
    };
    let key = TupleKey {
        netns_cookie: orig.netns_cookie,
        local,
        _pad: 0,
    };
    if FERRY_ORIG_BY_TUPLE
        .insert(key, orig, BPF_ANY as u64)
        .is_ok()
    {
        count(counters::ORIG_DST_RECORDED);
    }
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeername4(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { FERRY_ORIG_BY_COOKIE.get(cookie) }
        && orig.dst.family == FAMILY_V4
    {
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.dst.addr[0];
        sa.user_port = u16::to_be(orig.dst.port) as u32;
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn ferry_getpeername6(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { FERRY_ORIG_BY_COOKIE.get(cookie) }
        && orig.dst.family == FAMILY_V6
    {
        let sa = unsafe { &mut *ctx.sock_addr };
        write_ip6(sa, orig.dst.addr);
        sa.user_port = u16::to_be(orig.dst.port) as u32;
    }
    1
}

#[sk_lookup]
pub fn ferry_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP || lk.ingress_ifindex == LOOPBACK_IFINDEX {
        return sk_action::SK_PASS;
    }
    let port = lk.local_port as u16;
    if unsafe { FERRY_IN_EXCLUDE_PORTS.get(port) }.is_some() {
        count(counters::INBOUND_BYPASSED);
        return sk_action::SK_PASS;
    }
    let v4 = lk.family == FAMILY_V4 as u32;
    let (local, remote) = if v4 {
        unsafe {
            (
                [read_volatile(&lk.local_ip4), 0, 0, 0],
                [read_volatile(&lk.remote_ip4), 0, 0, 0],
            )
        }
    } else {
        unsafe {
            (
                [
                    read_volatile(&lk.local_ip6[0]),
                    read_volatile(&lk.local_ip6[1]),
                    read_volatile(&lk.local_ip6[2]),
                    read_volatile(&lk.local_ip6[3]),
                ],
                [
                    read_volatile(&lk.remote_ip6[0]),
                    read_volatile(&lk.remote_ip6[1]),
                    read_volatile(&lk.remote_ip6[2]),
                    read_volatile(&lk.remote_ip6[3]),
                ],
            )
        }
    };
    let family = if v4 { FAMILY_V4 } else { FAMILY_V6 };
    let delivery = DeliveryKey {
        src: RawAddr {
            addr: remote,
            port: u16::from_be(lk.remote_port),
            family,
        },
        dst: RawAddr {
            addr: local,
            port,
            family,
        },
    };
    if unsafe { FERRY_DELIVERIES.get(delivery) }.is_some() {
        count(counters::INBOUND_DELIVERY_PASSED);
        return sk_action::SK_PASS;
    }
    let hbone = settings().map(|s| s.hbone_port == port).unwrap_or(false);
    let addr = local;
    let key = SocketKey {
        addr,
        kind: if hbone {
            SOCK_KIND_HBONE
        } else {
            SOCK_KIND_INBOUND
        },
        family: lk.family,
    };
    match FERRY_SOCKETS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(counters::INBOUND_STEERED);
            sk_action::SK_PASS
        }
        Err(_) => {
            count(counters::INBOUND_DROPPED_NO_AGENT);
            sk_action::SK_DROP
        }
    }
}

/// The same-node fast path: bytes received on one of the agent's joined sockets leave through the other.
/// Runs under the receiving socket's lock, so the updates of its entry never race each other.
#[stream_verdict]
pub fn ferry_splice_verdict(ctx: SkBuffContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = FERRY_SPLICE_PEERS.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    let len = ctx.len() as u64;
    // A bare FIN reaches the verdict as a buffer without bytes. Redirected, the kernel's sender would
    // hand the peer socket a zero-length send, take it as a broken pipe and set EPIPE on that socket
    // — failing a connection that carried every byte. The end of stream needs no buffer: TCP already
    // marked this socket shut for reading, which is what the agent's read of 0 bytes reports.
    if len == 0 {
        return sk_action::SK_DROP;
    }
    unsafe {
        // Once anything went to userspace, everything does: a later redirected byte must not overtake
        // a byte still waiting for the agent to read it.
        if (*entry).passed != 0 {
            pass_on(&ctx, cookie, len);
            return sk_action::SK_PASS;
        }
        // TCP queues a retransmitted segment that overlaps bytes already received whole, and the
        // verdict is handed whole buffers (`tcp_read_skb`): the head, carried once already, must not
        // be carried again. `tcp_recvmsg` skips it by comparing the buffer's first sequence number
        // with the socket's `copied_seq`; this does the same. The kernel advances `copied_seq` by
        // what is left of each buffer after the verdict (`tcp_eat_skb`), so it is always the first
        // byte not carried yet — from the agent's reads before the join on — and needs no state here.
        // A buffer whose numbers cannot be read, or do not fit that picture, goes to userspace, and
        // everything after it with it.
        let repeated = match repeated_head(&ctx) {
            Ok(r) => r,
            Err(reason) => return to_userspace(entry, reason),
        };
        if repeated > 0 {
            if repeated as u64 >= len {
                return to_userspace(entry, pass_reason::REPEAT_TOO_LONG);
            }
            if !cut_head(&ctx, repeated) {
                return to_userspace(entry, pass_reason::CUT_FAILED);
            }
            (*entry).repeats = (*entry).repeats.wrapping_add(1);
        }
        let whole = len;
        let len = ctx.len() as u64;
        let mut peer = (*entry).peer;
        if FERRY_SPLICE.redirect_skb(&ctx, &mut peer, 0) as u32 == sk_action::SK_PASS {
            (*entry).redirected += len;
            count_splice(splice_counters::REDIRECTED);
            return sk_action::SK_PASS;
        }
        // Up to here `copied_seq` was right, so this buffer's end is where the count for the bytes
        // userspace now gets starts. Its sequence number is the one TCP queued it with, before any
        // cut (the cut does not move it).
        if let Some(seq) = buffer_seq(&ctx) {
            let _ = FERRY_SPLICE_NEXT.insert(cookie, seq.wrapping_add(whole as u32), 0);
        }
        to_userspace(entry, pass_reason::REDIRECT_FAILED)
    }
}

/// From now on this socket's bytes go to userspace, this buffer first; `reason` tells the agent why.
#[inline(always)]
unsafe fn to_userspace(entry: *mut SplicePeer, reason: u32) -> u32 {
    unsafe { (*entry).passed = reason };
    count_splice(splice_counters::PASSED);
    sk_action::SK_PASS
}

/// The guard for a socket whose bytes go to userspace: what the verdict passes on is queued for the
/// agent whole, and its `copied_seq` moves only as the agent reads, so the next expected number is
/// kept in `FERRY_SPLICE_NEXT` from the moment of the fallback on. Without an entry (a fallback the
/// agent made, or an evicted one) buffers are passed on as they are. A repeated head the guard cannot
/// cut is named in the socket's entry, so the agent refuses to relay those bytes a second time.
#[inline(always)]
fn pass_on(ctx: &SkBuffContext, cookie: u64, len: u64) {
    let Some(next) = FERRY_SPLICE_NEXT.get_ptr_mut(cookie) else {
        return;
    };
    let Some(seq) = buffer_seq(ctx) else {
        return;
    };
    let repeated = unsafe { *next }.wrapping_sub(seq);
    let end = seq.wrapping_add(len as u32);
    // Whatever happens to this buffer, the count goes on from its end.
    unsafe { *next = end };
    // After `next` (a wrapped, huge difference) would mean a gap, which a receive queue never has.
    if repeated == 0 || repeated > u32::MAX / 2 {
        return;
    }
    let problem = if repeated as u64 >= len || repeated > MAX_REPEAT {
        pass_reason::REPEAT_TOO_LONG
    } else if !cut_head(ctx, repeated) {
        pass_reason::CUT_FAILED
    } else {
        0
    };
    if let Some(entry) = FERRY_SPLICE_PEERS.get_ptr_mut(cookie) {
        unsafe {
            if problem == 0 {
                (*entry).repeats = (*entry).repeats.wrapping_add(1);
            } else {
                (*entry).passed = problem;
            }
        }
    }
}

/// Byte offsets in kernel structures, from the kernel's BTF, set by the agent at load time (0:
/// unknown, and the agent does not attach the verdict then): `sk_buff.cb` (which opens with
/// `struct tcp_skb_cb`, whose first field is the buffer's first sequence number), `sk_buff.sk` and
/// `tcp_sock.copied_seq`. `__sk_buff` exposes none of them.
#[unsafe(no_mangle)]
static SKB_CB_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SKB_SK_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ_OFFSET: u32 = 0;

/// The most a buffer's head may repeat. A buffer in the receive queue is not bounded by a segment:
/// TCP merges arriving segments into the last queued buffer up to `MAX_SKB_FRAGS` page fragments (17
/// by default, at most 32 KiB each), so neither is a repeated head.
const MAX_REPEAT: u32 = CUT_STEPS * CUT_STEP;

/// `bpf_skb_adjust_room` cuts at most 4,095 bytes a call from an sk_skb buffer.
const CUT_STEP: u32 = 4095;
const CUT_STEPS: u32 = 256;

/// How many bytes at the head of the buffer the socket already handed on: its `copied_seq` less the
/// buffer's first sequence number; otherwise the [`pass_reason`] why that is not a repeat the guard
/// can cut.
#[inline(always)]
fn repeated_head(ctx: &SkBuffContext) -> Result<u32, u32> {
    let (sk_at, copied_at) = unsafe {
        (
            read_volatile(&SKB_SK_OFFSET) as usize,
            read_volatile(&TCP_COPIED_SEQ_OFFSET) as usize,
        )
    };
    if sk_at == 0 || copied_at == 0 {
        return Err(pass_reason::SEQ_UNREADABLE);
    }
    let seq = buffer_seq(ctx).ok_or(pass_reason::SEQ_UNREADABLE)?;
    // The context is the kernel's `struct sk_buff`.
    let skb = ctx.skb.skb as usize;
    let sk = unsafe { bpf_probe_read_kernel((skb + sk_at) as *const usize) }
        .map_err(|_| pass_reason::SEQ_UNREADABLE)?;
    if sk == 0 {
        return Err(pass_reason::SEQ_UNREADABLE);
    }
    let copied = unsafe { bpf_probe_read_kernel((sk + copied_at) as *const u32) }
        .map_err(|_| pass_reason::SEQ_UNREADABLE)?;
    match copied.wrapping_sub(seq) {
        r if r <= MAX_REPEAT => Ok(r),
        // Behind `seq` (a wrapped, huge difference) would mean a gap before the buffer, which a
        // receive queue never has.
        r if r > u32::MAX / 2 => Err(pass_reason::SEQ_AHEAD),
        _ => Err(pass_reason::REPEAT_TOO_LONG),
    }
}

/// The buffer's first TCP sequence number (`TCP_SKB_CB(skb)->seq`).
#[inline(always)]
fn buffer_seq(ctx: &SkBuffContext) -> Option<u32> {
    let cb = unsafe { read_volatile(&SKB_CB_OFFSET) } as usize;
    if cb == 0 {
        return None;
    }
    let skb = ctx.skb.skb as usize;
    unsafe { bpf_probe_read_kernel((skb + cb) as *const u32) }.ok()
}

/// Cuts `n` bytes (at most [`MAX_REPEAT`]) off the front of the buffer, [`CUT_STEP`] at a time.
#[inline(always)]
fn cut_head(ctx: &SkBuffContext, n: u32) -> bool {
    let mut left = n;
    let mut i = 0;
    while i < CUT_STEPS && left > 0 {
        let step = if left > CUT_STEP { CUT_STEP } else { left };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        left -= step;
        i += 1;
    }
    left == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
