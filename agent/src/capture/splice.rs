//! The same-node fast path: the agent's two sockets of an authorized same-node connection (the app's
//! captured connection and the delivery to the destination app) are joined in the kernel, so their
//! bytes no longer cross userspace.
//!
//! Both sockets go into the `FERRY_SPLICE` sockhash, keyed by socket cookie, and `FERRY_SPLICE_PEERS`
//! tells the `sk_skb` stream verdict where each one's bytes go and counts them. The agent still owns both
//! sockets: an end of stream still shows up as a read of 0 bytes, a policy change still closes them, and
//! byte counts come from the map.
//!
//! Bytes can never overtake each other: the peer entries exist before either socket enters the map, so
//! every byte either goes through the verdict (in order, under the socket's lock) or, once the verdict
//! could not redirect, every later byte of that socket goes to userspace too.
use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use ferry_common::{SplicePeer, pass_reason};

use super::CaptureError;

const SO_COOKIE: libc::c_int = 57;

/// Handles on the fast path's maps; present when the verdict program is attached.
pub struct Splice {
    sockets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, SplicePeer>>,
    /// The verdict's next expected sequence number for sockets whose bytes went to userspace.
    next: Mutex<HashMap<MapData, u64, u32>>,
    /// Joined connections whose byte counts were checked when they ended, and of those, the ones
    /// that did not add up (see [`Joined::record_check`]).
    checked: AtomicU64,
    mismatched: AtomicU64,
    /// Buffers of ended joined connections whose repeated head the verdict cut.
    repeats: AtomicU64,
    /// Connections ended because bytes the kernel handed the agent could not be relayed safely.
    refused: AtomicU64,
    /// Joined pairs alive now.
    live: AtomicUsize,
    /// Pairs not joined because `max_joined` were joined already.
    at_cap: AtomicU64,
    /// The most pairs joined at once (at most [`ferry_common::SPLICE_MAX_PAIRS`]); pairs beyond it
    /// are relayed in userspace.
    max_joined: usize,
}

/// One of the two sockets of a joined pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// Whether a joined socket's bytes went to userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passed {
    No,
    /// Since the verdict (or the agent) sent them there, for this [`pass_reason`].
    Because(u32),
    /// Its entry is gone (evicted) or unreadable: as good as passed.
    Unknown,
}

impl std::fmt::Display for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Passed::No => f.write_str("no"),
            Passed::Because(r) => f.write_str(pass_reason::name(*r)),
            Passed::Unknown => f.write_str("its map entry is gone"),
        }
    }
}

/// A joined pair. Dropping it removes the pair from the maps.
pub struct Joined {
    splice: Arc<Splice>,
    cookies: [u64; 2],
    /// What each socket had been given to send when joined (see [`written`]).
    written_at_join: [u64; 2],
    /// What each socket had received and handed on when joined (see [`consumed`]).
    consumed_at_join: [u64; 2],
    /// Whether the kernel carries the bytes; false when joining failed halfway and both sockets fell
    /// back to userspace.
    pub in_kernel: bool,
}

impl Splice {
    pub(super) fn new(
        sockets: SockHash<MapData, u64>,
        peers: HashMap<MapData, u64, SplicePeer>,
        next: HashMap<MapData, u64, u32>,
        max_joined: u32,
    ) -> Self {
        // Entries a predecessor left stay: during a handoff it still relays its joined connections
        // through them. Those of a killed agent name sockets that died with it; socket cookies are
        // never reused, so they only wait for the LRU to evict them.
        Self {
            sockets: Mutex::new(sockets),
            peers: Mutex::new(peers),
            next: Mutex::new(next),
            checked: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            at_cap: AtomicU64::new(0),
            max_joined: max_joined.min(ferry_common::SPLICE_MAX_PAIRS) as usize,
        }
    }

    /// The most pairs joined at once.
    pub fn max_joined(&self) -> usize {
        self.max_joined
    }

    /// Joins two established TCP sockets: what `a` receives leaves through `b`, and the other way round.
    /// `quiet` names the socket less likely to receive bytes right now; it goes into the map first.
    ///
    /// Fails without changing anything when the pair cannot be joined (the caller relays in userspace);
    /// `None` when [`Splice::max_joined`] pairs are joined already.
    pub fn join(
        self: &Arc<Self>,
        a: &impl AsRawFd,
        b: &impl AsRawFd,
        quiet: Side,
    ) -> Result<Option<Joined>, CaptureError> {
        let cookies = [socket_cookie(a), socket_cookie(b)];
        let [Ok(ca), Ok(cb)] = cookies else {
            return Err(CaptureError::Bpf {
                what: "joining a same-node connection".into(),
                message: "a socket has no cookie".into(),
            });
        };
        let written_at_join = [
            written(a).map_err(CaptureError::io("reading TCP_INFO"))?,
            written(b).map_err(CaptureError::io("reading TCP_INFO"))?,
        ];
        let consumed_at_join = [
            consumed(a).map_err(CaptureError::io("reading TCP_INFO"))?,
            consumed(b).map_err(CaptureError::io("reading TCP_INFO"))?,
        ];
        // Released by the `Joined` made right after it, whatever happens to it.
        if self
            .live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_joined).then_some(n + 1)
            })
            .is_err()
        {
            self.at_cap.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let mut joined = Joined {
            splice: self.clone(),
            cookies: [ca, cb],
            written_at_join,
            consumed_at_join,
            in_kernel: true,
        };
        {
            let mut peers = self
                .peers
                .lock()
                .map_err(|_| super::bpf::poisoned("FERRY_SPLICE_PEERS"))?;
            let entry = |peer| SplicePeer {
                peer,
                ..SplicePeer::default()
            };
            peers
                .insert(ca, entry(cb), 0)
                .and_then(|()| peers.insert(cb, entry(ca), 0))
                .map_err(CaptureError::bpf("joining in FERRY_SPLICE_PEERS"))?;
        }
        let mut sockets = self
            .sockets
            .lock()
            .map_err(|_| super::bpf::poisoned("FERRY_SPLICE"))?;
        // Between the two inserts, bytes arriving on the socket already in the map cannot be
        // redirected (its peer is not there yet) and send that socket to userspace for good, while
        // bytes arriving on the other one wait in its queue for the verdict. So the quiet socket goes
        // in first.
        let (first, second) = match quiet {
            Side::A => ((ca, a.as_raw_fd()), (cb, b.as_raw_fd())),
            Side::B => ((cb, b.as_raw_fd()), (ca, a.as_raw_fd())),
        };
        // Nothing was in the sockhash yet: a failure here leaves both sockets as they were, and the
        // guard's drop removes the peer entries.
        sockets
            .insert(first.0, first.1, 0)
            .map_err(CaptureError::bpf("joining in FERRY_SPLICE"))?;
        if let Err(e) = sockets.insert(second.0, second.1, 0) {
            // The first socket is in the map and may already have handed bytes to userspace: taking
            // it out again would drop them. Both sides fall back to userspace instead.
            drop(sockets);
            joined.fall_back();
            tracing::warn!(error = %CaptureError::bpf("joining in FERRY_SPLICE")(e), "same-node fast path not used for this connection");
            return Ok(Some(joined));
        }
        drop(sockets);
        // Bytes that reached a socket after the caller saw its queue empty but before the socket was in
        // the map sit in its receive queue: the verdict only runs when more arrive, and an app waiting
        // for an answer sends no more. Setting SO_RCVLOWAT makes TCP run the socket's data-ready hook
        // (the verdict, under the socket's lock) over what is queued, so every byte goes through the
        // verdict in order and none is left for a read from userspace.
        if let Err(e) = flush_to_verdict(first.1).and_then(|()| flush_to_verdict(second.1)) {
            joined.fall_back();
            tracing::warn!(error = %e, "same-node fast path not used for this connection: handing queued bytes to the verdict");
        }
        Ok(Some(joined))
    }

    /// Joined connections checked at their end, and those whose counts did not add up.
    pub fn checks(&self) -> (u64, u64) {
        (
            self.checked.load(Ordering::Relaxed),
            self.mismatched.load(Ordering::Relaxed),
        )
    }

    /// Buffers whose repeated head the verdict cut, on joined connections that ended.
    pub fn repeats(&self) -> u64 {
        self.repeats.load(Ordering::Relaxed)
    }

    /// Connections ended rather than relay bytes the kernel handed the agent (see
    /// [`Joined::record_refused`]).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Pairs relayed in userspace because [`Splice::max_joined`] pairs were joined already.
    pub fn at_cap(&self) -> u64 {
        self.at_cap.load(Ordering::Relaxed)
    }
}

impl Joined {
    /// Counts a finished check of this pair's bytes (`whole`: every count added up), for the
    /// `splice_checked` and `splice_mismatched` capture events.
    pub fn record_check(&self, whole: bool) {
        self.splice.checked.fetch_add(1, Ordering::Relaxed);
        if !whole {
            self.splice.mismatched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection ended because bytes the kernel handed the agent could have been delivered
    /// twice or out of order, for the `splice_refused` capture event.
    pub fn record_refused(&self) {
        self.splice.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes the kernel carried so far: (`a` → `b`, `b` → `a`).
    pub fn redirected(&self) -> (u64, u64) {
        let Ok(peers) = self.splice.peers.lock() else {
            return (0, 0);
        };
        let get = |c: &u64| peers.get(c, 0).map(|e| e.redirected).unwrap_or(0);
        (get(&self.cookies[0]), get(&self.cookies[1]))
    }

    /// Whether, and why, each socket's bytes went to userspace (a peer was not in the map yet, or left
    /// it, or the guard could not tell a repeat): those bytes wait in that socket for a read, in order.
    pub fn passed(&self) -> [Passed; 2] {
        [Side::A, Side::B].map(|side| self.passed_by(side))
    }

    /// [`Joined::passed`] for one socket: one map lookup.
    pub fn passed_by(&self, side: Side) -> Passed {
        let Ok(peers) = self.splice.peers.lock() else {
            return Passed::Unknown;
        };
        let cookie = match side {
            Side::A => self.cookies[0],
            Side::B => self.cookies[1],
        };
        match peers.get(&cookie, 0) {
            Ok(e) if e.passed == 0 => Passed::No,
            Ok(e) => Passed::Because(e.passed),
            Err(_) => Passed::Unknown,
        }
    }

    /// How many of the bytes the kernel redirected into `to` plus the `user` bytes the agent wrote to
    /// it itself since the join `to` has not taken yet, into its send queue or already acknowledged
    /// (0: drained). The kernel hands redirected bytes to the sending socket from a work queue:
    /// shutting down `to`, or writing to it, before they are all in would lose or overtake them.
    pub fn undrained(&self, to: Side, fd: &impl AsRawFd, user: u64) -> io::Result<u64> {
        let (given, into) = self.given_and_redirected(to, fd)?;
        Ok((into + user).saturating_sub(given))
    }

    /// Bytes the verdict redirected out of `from` since the join, plus the `user` bytes the agent read
    /// from it, beyond what `from` received in that time: zero or less (its end of stream takes a
    /// sequence number TCP counts as received) unless the verdict ran twice over received bytes.
    /// Where [`Joined::surplus`] finds a socket given more than was redirected into it, this tells
    /// whether the extra bytes came from the receiving side.
    pub fn overcounted(&self, from: Side, fd: &impl AsRawFd, user: u64) -> io::Result<i64> {
        let (ab, ba) = self.redirected();
        let (out, base) = match from {
            Side::A => (ab, self.consumed_at_join[0]),
            Side::B => (ba, self.consumed_at_join[1]),
        };
        let received = tcp_info(fd)?.tcpi_bytes_received.saturating_sub(base);
        Ok((out + user) as i64 - received as i64)
    }

    /// What `to` was given to send since the join, and what the kernel redirected into it.
    fn given_and_redirected(&self, to: Side, fd: &impl AsRawFd) -> io::Result<(u64, u64)> {
        let (ab, ba) = self.redirected();
        let (into, base) = match to {
            Side::A => (ba, self.written_at_join[0]),
            Side::B => (ab, self.written_at_join[1]),
        };
        Ok((written(fd)?.saturating_sub(base), into))
    }

    /// Bytes `to` was given to send since the join beyond the `user` bytes the agent wrote to it and
    /// those the kernel redirected into it: zero unless the kernel sent something twice (positive)
    /// or lost it (negative). For a socket the agent has shut down for writing, once both directions
    /// have seen their end of stream: its FIN takes a sequence number, which `written` counts.
    pub fn surplus(&self, to: Side, fd: &impl AsRawFd, user: u64) -> io::Result<i64> {
        let (given, into) = self.given_and_redirected(to, fd)?;
        Ok(given as i64 - (into + user) as i64 - 1)
    }

    fn fall_back(&mut self) {
        self.in_kernel = false;
        if let Ok(mut peers) = self.splice.peers.lock() {
            for (i, c) in self.cookies.iter().enumerate() {
                let entry = SplicePeer {
                    peer: self.cookies[1 - i],
                    passed: pass_reason::AGENT,
                    ..SplicePeer::default()
                };
                let _ = peers.insert(c, entry, 0);
            }
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.splice.live.fetch_sub(1, Ordering::Relaxed);
        // A closed socket leaves the sockhash by itself; its peer entry does not.
        if let Ok(mut sockets) = self.splice.sockets.lock() {
            for c in &self.cookies {
                ignore_missing(sockets.remove(c));
            }
        }
        let mut passed = Vec::new();
        if let Ok(mut peers) = self.splice.peers.lock() {
            for c in &self.cookies {
                if let Ok(e) = peers.get(c, 0) {
                    self.splice
                        .repeats
                        .fetch_add(u64::from(e.repeats), Ordering::Relaxed);
                    if e.passed != 0 {
                        passed.push(*c);
                    }
                }
                ignore_missing(peers.remove(c));
            }
        }
        // Only a socket whose bytes went to userspace has a `FERRY_SPLICE_NEXT` entry (the LRU
        // evicts one whose peer entry was already gone).
        if !passed.is_empty()
            && let Ok(mut next) = self.splice.next.lock()
        {
            for c in &passed {
                ignore_missing(next.remove(c));
            }
        }
    }
}

fn ignore_missing(r: Result<(), MapError>) {
    if let Err(e) = r
        && !matches!(e, MapError::KeyNotFound)
    {
        tracing::debug!(error = %e, "removing a fast-path entry");
    }
}

/// Runs a TCP socket's data-ready hook over its receive queue: `SO_RCVLOWAT` (set to 1, the default,
/// so reads and polls behave as before) checks whether readers need waking right away.
fn flush_to_verdict(fd: std::os::fd::RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is one int, and `fd` is a socket the caller keeps open.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's cookie of a socket (`SO_COOKIE`), which `bpf_get_socket_cookie` returns for it.
fn socket_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    crate::netns::socket_option_u64(sock, SO_COOKIE)
}

/// Bytes a TCP socket has been given to send over its lifetime: acknowledged plus still queued, and
/// one more once its FIN is queued (TCP numbers it like a byte).
///
/// The two figures take two calls, and an acknowledgement landing between them moves bytes from one
/// to the other: read acknowledged-then-queued, the sum comes out low by what it covered (65,536
/// bytes at once on loopback), which made a join's starting point low and the end-of-connection
/// check report a surplus that was not there. The queue is read before and after: equal, nothing
/// was acknowledged in between and the sum is exact; otherwise it is read again. A socket that
/// keeps moving gets the low sum, which only makes [`Joined::undrained`] wait a little longer.
fn written(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut queued = crate::netns::unsent_bytes(sock)?;
    let mut sum = 0;
    for _ in 0..4 {
        let acked = tcp_info(sock)?.tcpi_bytes_acked;
        let after = crate::netns::unsent_bytes(sock)?;
        sum = acked + after;
        if after == queued {
            break;
        }
        queued = after;
    }
    Ok(sum)
}

/// Bytes a TCP socket has received and no longer holds unread. Read in that order, bytes arriving
/// in between can only make it low, so a check built on it errs towards silence.
fn consumed(sock: &impl AsRawFd) -> io::Result<u64> {
    let received = tcp_info(sock)?.tcpi_bytes_received;
    Ok(received.saturating_sub(crate::netns::unread_bytes(sock)?))
}

/// Whether a TCP socket is still established both ways: a sockhash takes no other (a socket that
/// received its peer's FIN is refused with `EOPNOTSUPP`), and a stream that is ending gains nothing
/// from a join.
pub fn established(sock: &impl AsRawFd) -> bool {
    const TCP_ESTABLISHED: u8 = 1;
    tcp_info(sock).is_ok_and(|i| i.tcpi_state == TCP_ESTABLISHED)
}

fn tcp_info(sock: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: an all-zero tcp_info is valid; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid tcp_info.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}
