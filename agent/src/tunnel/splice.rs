//! The relay between two TCP streams of this node (same-node deliveries, passthrough, permissive
//! plaintext), in userspace or — for authorized same-node connections — joined in the kernel.
use std::{
    io,
    io::Read,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::BufMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest, unix::AsyncFd},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};

use super::{
    CopyStats,
    conn::Outcome,
    copy::{CHUNK, FIRST_READ, next_read_size},
    kill::KillSwitch,
};
use crate::capture::splice::{Joined, Passed, Side, Splice};

/// How long a connection is relayed in userspace before it is joined in the kernel. Joining and
/// parting cost a handful of syscalls and the kernel's per-socket state, which a connection that
/// only lives for one exchange would not win back.
pub const JOIN_AFTER: Duration = Duration::from_millis(5);

/// How soon, and at most how seldom, a joined pair is checked for bytes left to userspace without a
/// wake-up (see [`in_kernel`]).
const LOOK_FIRST: Duration = Duration::from_millis(100);
const LOOK_MAX: Duration = Duration::from_secs(5);

/// The kernel carries at most a send buffer per socket between two runs of its work queue, which
/// waits a clock tick whenever the buffer is full: room for a tick of fast local traffic.
const JOINED_SNDBUF: usize = 4 << 20;

/// How long bytes the kernel redirected may stay undelivered, with the socket they are for idle,
/// before the relay gives the connection up as having lost them.
const DRAIN_STALL: Duration = Duration::from_secs(10);

/// Copies both ways between two TCP streams with half-close carried through (EOF on one side shuts
/// down the other's write half), counting as bytes flow: `sent` is `a` → `b`.
///
/// With `fast`, a connection still open after [`JOIN_AFTER`] is joined in the kernel (the same-node
/// fast path) at the first moment both receive queues are empty and neither direction is in the
/// middle of a write: the kernel's verdict takes whole socket buffers, and one userspace had read in
/// part would be sent again from its start. From then on the agent reads neither socket: it waits
/// for each stream's end (see `EndWatch`), which it carries on once the kernel has handed over
/// every byte before it. If joining fails the relay goes on in userspace.
pub async fn splice(
    a: TcpStream,
    b: TcpStream,
    stats: &CopyStats,
    kill: &KillSwitch,
    fast: Option<&Arc<Splice>>,
) -> Outcome {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let pair = Pair {
        fds: [a.as_raw_fd(), b.as_raw_fd()],
        splice: fast.cloned(),
        join_at: Instant::now() + JOIN_AFTER,
        idle: [AtomicBool::new(false), AtomicBool::new(false)],
        drained_for_good: [AtomicBool::new(false), AtomicBool::new(false)],
        joined: OnceLock::new(),
        stats,
    };
    // Either direction failing ends both: the sockets are dropped together when this returns.
    let result = tokio::select! {
        r = relay(&pair, a, b) => r,
        () = kill.killed() => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by a policy change",
        )),
    };
    stats.settle_kernel();
    match result {
        Ok(()) => Outcome::Closed {
            sent: stats.sent(),
            received: stats.received(),
        },
        Err(e) => Outcome::Error {
            sent: stats.sent(),
            received: stats.received(),
            error: e.to_string(),
        },
    }
}

/// Both directions until each has carried its end of stream: in userspace, then — once joined —
/// in the kernel with the agent only watching for the ends, and back in userspace should the kernel
/// ever hand a joined socket's bytes to the agent.
async fn relay(pair: &Pair<'_>, mut a: TcpStream, mut b: TcpStream) -> io::Result<()> {
    let mut ended = [false; 2];
    loop {
        // Checked while the sockets are still open: their counters go with them.
        if !in_user(pair, &mut a, &mut b, &mut ended).await? {
            pair.check_accounting();
            return Ok(());
        }
        let (sa, sb) = (a.into_std()?, b.into_std()?);
        let Some((from, pending)) = in_kernel(pair, [&sa, &sb], &mut ended).await? else {
            pair.check_accounting();
            return Ok(());
        };
        a = TcpStream::from_std(sa)?;
        b = TcpStream::from_std(sb)?;
        match from {
            Side::A => {
                pair.drained(Side::B).await?;
                b.write_all(&pending).await?;
                pair.stats.add_sent(pending.len());
            }
            Side::B => {
                pair.drained(Side::A).await?;
                a.write_all(&pending).await?;
                pair.stats.add_received(pending.len());
            }
        }
    }
}

/// How a direction's pump stopped.
enum Pumped {
    /// It carried the end of stream.
    Eof,
    /// The pair was joined in the kernel: this direction's bytes no longer come through userspace.
    Joined,
}

/// The userspace relay, for the directions not `ended` yet. True when the pair was joined in the
/// kernel (every direction's reads stop then), false once every direction has ended.
async fn in_user(
    pair: &Pair<'_>,
    a: &mut TcpStream,
    b: &mut TcpStream,
    ended: &mut [bool; 2],
) -> io::Result<bool> {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let up = pump(pair, Side::A, &mut ar, &mut bw);
    let down = pump(pair, Side::B, &mut br, &mut aw);
    tokio::pin!(up, down);
    while *ended != [true, true] {
        let (side, pumped) = tokio::select! {
            r = &mut up, if !ended[0] => (0, r?),
            r = &mut down, if !ended[1] => (1, r?),
        };
        match pumped {
            Pumped::Eof => ended[side] = true,
            // The other direction was waiting for bytes (a condition of joining): dropping its read
            // loses nothing.
            Pumped::Joined => return Ok(true),
        }
    }
    Ok(false)
}

/// A joined pair: the kernel carries the bytes, and the agent is woken only when a socket's peer
/// ends its stream or the socket fails — not for every buffer the verdict redirects, as a read
/// readiness would be. Returns the bytes a socket handed to userspace instead, if it ever does
/// (its peer left the sockhash), for the userspace relay to carry on from; `None` once every
/// direction has ended.
async fn in_kernel(
    pair: &Pair<'_>,
    socks: [&std::net::TcpStream; 2],
    ended: &mut [bool; 2],
) -> io::Result<Option<(Side, Vec<u8>)>> {
    let fds = [socks[0].as_raw_fd(), socks[1].as_raw_fd()];
    let watch = EndWatch::new(fds)?;
    let mut buf = [0u8; FIRST_READ];
    let mut look = LOOK_FIRST;
    while *ended != [true, true] {
        let ready = tokio::select! {
            r = watch.wait() => r?,
            () = tokio::time::sleep(look) => {
                // Bytes the verdict handed to userspace because the pair's entry was gone (evicted
                // from its map) wake nobody: look for them now and then rather than never.
                look = (look * 2).min(LOOK_MAX);
                [0, 1].map(|i| !ended[i] && queued(fds[i]) > 0)
            }
        };
        for (i, from) in [Side::A, Side::B].into_iter().enumerate() {
            if !ready[i] {
                continue;
            }
            if ended[i] {
                // Its stream ended already: only a failure matters now.
                if let Some(e) = socks[i].take_error()? {
                    return Err(e);
                }
                continue;
            }
            match (&mut &*socks[i]).read(&mut buf) {
                Ok(0) => {
                    let to = if from == Side::A { Side::B } else { Side::A };
                    pair.drained(to).await?;
                    socks[1 - i].shutdown(std::net::Shutdown::Write)?;
                    ended[i] = true;
                }
                Ok(n) => {
                    pair.refuse_unsafe_relay(from)?;
                    // Rare (a peer that left the sockhash or whose entry was evicted), and the
                    // rest of the connection costs userspace CPU again: worth a line.
                    tracing::info!(
                        side = ?from,
                        reason = %pair.passed()[i],
                        "same-node fast path: a joined socket's bytes went to userspace; relaying the rest in userspace"
                    );
                    return Ok(Some((from, buf[..n].to_vec())));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}

/// Waits for the ends of a joined pair's streams: an epoll set with only `EPOLLRDHUP` (and the
/// always-reported `EPOLLERR`/`EPOLLHUP`) asked of each socket, so the verdict's wake-ups for data
/// are filtered out in the kernel.
struct EndWatch {
    epoll: AsyncFd<OwnedFd>,
}

impl EndWatch {
    fn new(fds: [RawFd; 2]) -> io::Result<Self> {
        // SAFETY: plain syscall; a valid descriptor is owned below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` was just created and is owned by nothing else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        for (i, fd) in fds.into_iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are open; the event is a valid epoll_event.
            let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the descriptor (an OwnedFd), so it stays open exactly as long as
        // it is registered.
        let epoll = unsafe { AsyncFd::register_with_interest(ep, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { epoll })
    }

    /// Which sockets reported an end or a failure since the last call.
    async fn wait(&self) -> io::Result<[bool; 2]> {
        loop {
            let mut guard = self.epoll.readable().await?;
            // SAFETY: an all-zero epoll_event is valid.
            let mut events: [libc::epoll_event; 2] = unsafe { std::mem::zeroed() };
            // SAFETY: the buffer holds two events, as passed.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 2, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            let mut ready = [false; 2];
            for ev in &events[..n as usize] {
                if let Some(r) = ready.get_mut(ev.u64 as usize) {
                    *r = true;
                }
            }
            return Ok(ready);
        }
    }
}

/// A joined pair and the bytes userspace had relayed each way when it was joined.
struct JoinedAt {
    joined: Arc<Joined>,
    user: (u64, u64),
}

/// What both relay directions of one connection share. Both run in one task, so "the other
/// direction is waiting for bytes" is stable while one of them runs.
struct Pair<'a> {
    fds: [RawFd; 2],
    splice: Option<Arc<Splice>>,
    join_at: Instant,
    /// Whether each direction is waiting for bytes to read (not in the middle of a write).
    idle: [AtomicBool; 2],
    /// Per socket: it was handed every byte the kernel will ever redirect into it (the other
    /// socket's bytes go to userspace for good), so the relay's writes into it need not wait.
    drained_for_good: [AtomicBool; 2],
    /// Set once joining was tried; `None` when joining failed.
    joined: OnceLock<Option<JoinedAt>>,
    stats: &'a CopyStats,
}

impl Pair<'_> {
    fn index(side: Side) -> usize {
        match side {
            Side::A => 0,
            Side::B => 1,
        }
    }

    /// Joins the two sockets if it is time and safe: `from`'s direction just finished a write, the
    /// other one waits for bytes, and neither socket has unread bytes queued. True when the kernel
    /// now carries every byte of both, so the relay stops reading them.
    fn maybe_join(&self, from: Side) -> bool {
        let Some(splice) = &self.splice else {
            return false;
        };
        if self.joined.get().is_some() || Instant::now() < self.join_at {
            return false;
        }
        let other = 1 - Self::index(from);
        if !self.idle[other].load(Ordering::Relaxed) || self.fds.iter().any(|fd| queued(*fd) != 0) {
            return false;
        }
        // SAFETY: both descriptors belong to streams that outlive the relay.
        let (sa, sb) = unsafe {
            (
                BorrowedFd::borrow_raw(self.fds[0]),
                BorrowedFd::borrow_raw(self.fds[1]),
            )
        };
        // The last write of a stream that is ending finds both queues empty too; its sockets may
        // already have their peer's FIN, which the sockhash refuses, and a socket never gets back
        // to established: the pair stays in userspace without trying (or warning) again.
        use crate::capture::splice::established;
        if !(established(&sa) && established(&sb)) {
            let _ = self.joined.set(None);
            return false;
        }
        for s in [&sa, &sb] {
            let _ = socket2::SockRef::from(s).set_send_buffer_size(JOINED_SNDBUF);
        }
        let (joined, clean) = match splice.join(&sa, &sb, self.quiet_side(from)) {
            Ok(None) => {
                tracing::debug!(
                    "same-node fast path not used for this connection: {} pairs are joined already",
                    splice.max_joined()
                );
                (None, false)
            }
            Ok(Some(j)) => {
                // A socket whose bytes went to userspace while its peer was not in the map yet
                // keeps sending them there: the relay goes on reading both.
                let passed = j.passed();
                let clean = j.in_kernel && passed == [Passed::No; 2];
                if j.in_kernel && !clean {
                    tracing::info!(
                        passed_a = %passed[0],
                        passed_b = %passed[1],
                        "same-node fast path: bytes went to userspace while joining; the relay reads both sockets on"
                    );
                }
                let j = Arc::new(j);
                self.stats.add_kernel(j.clone());
                let at = JoinedAt {
                    joined: j,
                    user: self.stats.in_user(),
                };
                (Some(at), clean)
            }
            Err(e) => {
                tracing::warn!(error = %e, "same-node fast path not used for this connection");
                (None, false)
            }
        };
        let _ = self.joined.set(joined);
        clean
    }

    /// Once both directions ended cleanly: every byte each socket was given since the join came from
    /// the kernel's verdict or from the agent, once. A mismatch is the kernel's, reported loudly: the
    /// app at that end saw bytes twice or not at all.
    fn check_accounting(&self) {
        let Some(Some(JoinedAt {
            joined,
            user: at_join,
        })) = self.joined.get()
        else {
            return;
        };
        if !joined.in_kernel {
            return;
        }
        let (sent, received) = self.stats.in_user();
        // Counted as checked only when every measurement could be taken.
        let (mut ran, mut whole) = (true, true);
        for (from, to, user) in [
            (Side::A, Side::B, sent - at_join.0),
            (Side::B, Side::A, received - at_join.1),
        ] {
            // SAFETY: the descriptors belong to streams that outlive the relay.
            let sock = unsafe { BorrowedFd::borrow_raw(self.fds[Self::index(to)]) };
            let source = unsafe { BorrowedFd::borrow_raw(self.fds[Self::index(from)]) };
            let findings = [
                (
                    from,
                    joined
                        .overcounted(from, &source, user)
                        // At or below zero is whole: the FIN counts as received, not carried.
                        .map(|over| over.max(0)),
                    "the verdict carried more bytes than the socket received",
                ),
                (
                    to,
                    joined.surplus(to, &sock, user),
                    "a socket was given bytes the relay did not account for",
                ),
            ];
            for (side, found, what) in findings {
                match found {
                    Ok(0) => {}
                    Ok(bytes) => {
                        whole = false;
                        let (ab, ba) = joined.redirected();
                        let passed = joined.passed();
                        tracing::error!(
                            side = ?side,
                            bytes,
                            user_since_join = user,
                            redirected_ab = ab,
                            redirected_ba = ba,
                            passed_a = %passed[0],
                            passed_b = %passed[1],
                            "same-node fast path: {what}"
                        );
                    }
                    Err(e) => {
                        ran = false;
                        tracing::warn!(error = %e, "same-node fast path: could not check the byte accounting");
                    }
                }
            }
        }
        if ran || !whole {
            joined.record_check(whole);
        }
    }

    /// Which socket is less likely to receive bytes in the next moments, judged from the connection so
    /// far, right after `from`'s direction carried some: in an exchange (bytes went both ways) the
    /// other app answers next, so `from`'s socket is quiet; in a one-way stream `from`'s app goes on
    /// sending, so the other socket is.
    fn quiet_side(&self, from: Side) -> Side {
        let (sent, received) = self.stats.in_user();
        let other_carried = match from {
            Side::A => received > 0,
            Side::B => sent > 0,
        };
        match (other_carried, from) {
            (true, side) => side,
            (false, Side::A) => Side::B,
            (false, Side::B) => Side::A,
        }
    }

    /// Fails when the agent cannot relay bytes `from` handed to userspace safely, and the connection
    /// ends instead: they may repeat bytes it had handed on before (the verdict passed a buffer whose
    /// repeated head it could not cut), or `from`'s map entry is gone (evicted), and with it the
    /// count that tells whether the kernel still holds bytes that must go out first.
    fn refuse_unsafe_relay(&self, from: Side) -> io::Result<()> {
        let Some(Some(at)) = self.joined.get() else {
            return Ok(());
        };
        let passed = at.joined.passed_by(from);
        let why = match passed {
            Passed::Because(r) if ferry_common::pass_reason::may_repeat(r) => {
                "the kernel handed the agent bytes it may have carried already; closing the connection rather than delivering them twice"
            }
            Passed::Unknown => {
                "a joined socket's map entry is gone (FERRY_SPLICE_PEERS evicted it), so the agent cannot order its bytes after those the kernel still holds; closing the connection rather than risk reordering them"
            }
            Passed::No | Passed::Because(_) => return Ok(()),
        };
        at.joined.record_refused();
        tracing::error!(side = ?from, reason = %passed, "same-node fast path: {why}");
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("same-node fast path: {why} ({passed})"),
        ))
    }

    /// Whether, and why, each socket's bytes went to userspace since the join.
    fn passed(&self) -> [Passed; 2] {
        match self.joined.get() {
            Some(Some(j)) => j.joined.passed(),
            _ => [Passed::No; 2],
        }
    }

    /// Before writing bytes or an end of stream into `to`: waits until the kernel has handed `to`
    /// every byte it redirected into it (see [`Joined::undrained`]).
    async fn drained(&self, to: Side) -> io::Result<()> {
        let Some(Some(JoinedAt {
            joined,
            user: at_join,
        })) = self.joined.get()
        else {
            return Ok(());
        };
        let done = &self.drained_for_good[Self::index(to)];
        if done.load(Ordering::Relaxed) {
            return Ok(());
        }
        // SAFETY: the descriptor belongs to a stream that outlives the relay.
        let sock = unsafe { BorrowedFd::borrow_raw(self.fds[Self::index(to)]) };
        let user = || {
            let (sent, received) = self.stats.in_user();
            match to {
                Side::B => sent - at_join.0,
                Side::A => received - at_join.1,
            }
        };
        let mut pause = Duration::from_micros(50);
        let mut last = (0, Instant::now());
        loop {
            let left = joined.undrained(to, &sock, user())?;
            if left == 0 {
                // A socket that passed once passes for good: the verdict redirects nothing more
                // out of it, so the count into `to` is final.
                let from = if to == Side::A { Side::B } else { Side::A };
                if matches!(joined.passed_by(from), Passed::Because(_)) {
                    done.store(true, Ordering::Relaxed);
                }
                return Ok(());
            }
            // The kernel's sender moves on whenever `to` has room. A count that stays put while
            // `to` has nothing left to send (the receiving app is not what holds it up) means
            // redirected bytes were lost: the connection ends rather than hangs.
            let held_up = crate::netns::unsent_bytes(&sock).map_or(true, |q| q > 0);
            if left != last.0 || held_up {
                last = (left, Instant::now());
            } else if last.1.elapsed() > DRAIN_STALL {
                let facing = match to {
                    Side::A => "client",
                    Side::B => "server",
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the kernel did not hand {left} redirected bytes to the {facing}-facing socket within {DRAIN_STALL:?}"
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// Unread bytes in a socket's receive queue (`FIONREAD`); on error, as if some were queued.
fn queued(fd: RawFd) -> u64 {
    // SAFETY: the descriptor belongs to a stream that outlives the relay.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    crate::netns::unread_bytes(&sock).unwrap_or(1)
}

/// Copies what `from` receives (`r`) into the other socket (`w`) until end of stream.
async fn pump(
    pair: &Pair<'_>,
    from: Side,
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
) -> io::Result<Pumped> {
    let me = Pair::index(from);
    let to = if from == Side::A { Side::B } else { Side::A };
    // Not zero-filled and grown only while reads come back full: an idle connection keeps a small
    // buffer.
    let mut buf = Vec::new();
    let mut want = FIRST_READ;
    loop {
        buf.clear();
        buf.reserve(want);
        pair.idle[me].store(true, Ordering::Relaxed);
        let n = r.read_buf(&mut buf).await;
        pair.idle[me].store(false, Ordering::Relaxed);
        if n? == 0 {
            pair.drained(to).await?;
            w.shutdown().await?;
            return Ok(Pumped::Eof);
        }
        top_up(r, &mut buf)?;
        pair.refuse_unsafe_relay(from)?;
        let n = buf.len();
        // On a joined pair whose bytes came back to userspace, the kernel sends what it redirected
        // into `to` from a work queue, later and in its own time: the agent's bytes must not
        // overtake them.
        pair.drained(to).await?;
        w.write_all(&buf[..n]).await?;
        match from {
            Side::A => pair.stats.add_sent(n),
            Side::B => pair.stats.add_received(n),
        }
        want = next_read_size(want, n);
        if pair.maybe_join(from) {
            return Ok(Pumped::Joined);
        }
    }
}

/// Reads on into `buf` while the reads fill it, up to [`CHUNK`]: the rest of a message that a small
/// first read left queued goes out in the same write, so the app gets one segment, and one wake-up,
/// instead of two. The read that finds the queue empty is the one the next round would have made.
fn top_up(r: &ReadHalf<'_>, buf: &mut Vec<u8>) -> io::Result<()> {
    while buf.len() == buf.capacity() && buf.len() < CHUNK {
        let room = buf.len().min(CHUNK - buf.len());
        buf.reserve(room);
        match r.try_read_buf(&mut (&mut *buf).limit(room)) {
            Ok(m) if m == room => {}
            // Less than there was room for, or the end of stream, which the next read sees again.
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(stats: &CopyStats) -> Pair<'_> {
        Pair {
            fds: [-1, -1],
            splice: None,
            join_at: Instant::now(),
            idle: [AtomicBool::new(false), AtomicBool::new(false)],
            drained_for_good: [AtomicBool::new(false), AtomicBool::new(false)],
            joined: OnceLock::new(),
            stats,
        }
    }

    #[tokio::test]
    async fn the_rest_of_a_message_goes_out_in_the_same_write() -> io::Result<()> {
        for (queued, taken) in [
            (1024, 1024),
            (3000, 3000),
            (100, 100),
            (CHUNK + 4096, CHUNK),
        ] {
            let (_writer, mut reader) = super::super::copy::queued_loopback(queued)?;
            let (mut r, _w) = reader.split();
            let mut buf = Vec::with_capacity(FIRST_READ);
            let n = r.read_buf(&mut buf).await?;
            assert!(n > 0, "queued bytes not read");
            top_up(&r, &mut buf)?;
            assert_eq!(buf.len(), taken, "{queued} bytes queued");
        }
        Ok(())
    }

    #[test]
    fn in_an_exchange_the_side_that_just_sent_is_quiet() {
        let stats = CopyStats::default();
        stats.add_sent(10);
        stats.add_received(20);
        let p = pair(&stats);
        assert_eq!(p.quiet_side(Side::A), Side::A);
        assert_eq!(p.quiet_side(Side::B), Side::B);
    }

    #[test]
    fn in_a_one_way_stream_the_receiving_side_is_quiet() {
        let stats = CopyStats::default();
        stats.add_sent(1 << 20);
        let p = pair(&stats);
        assert_eq!(p.quiet_side(Side::A), Side::B, "A streams to B");
        let stats = CopyStats::default();
        stats.add_received(1 << 20);
        let p = pair(&stats);
        assert_eq!(p.quiet_side(Side::B), Side::A, "B streams to A");
    }

    #[tokio::test]
    async fn end_watch_wakes_for_an_end_of_stream_not_for_data() -> io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        let other = std::net::TcpListener::bind("127.0.0.1:0")?;
        let _idle = std::net::TcpStream::connect(other.local_addr()?)?;
        let (idle_server, _) = other.accept()?;
        let watch = EndWatch::new([server.as_raw_fd(), idle_server.as_raw_fd()])?;
        std::io::Write::write_all(&mut client, b"data")?;
        let woken = tokio::time::timeout(Duration::from_millis(200), watch.wait()).await;
        assert!(woken.is_err(), "bytes to read are not an end: {woken:?}");
        client.shutdown(std::net::Shutdown::Write)?;
        let ready = tokio::time::timeout(Duration::from_secs(5), watch.wait())
            .await
            .map_err(|_| io::Error::other("no wake-up for the end of stream"))??;
        assert_eq!(ready, [true, false]);
        Ok(())
    }
}
