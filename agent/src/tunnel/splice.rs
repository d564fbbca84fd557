//! The relay between two TCP streams of this node (same-node deliveries, passthrough, permissive
//! plaintext), in userspace or — for authorized same-node connections — joined in the kernel.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};

use super::{
    CopyStats,
    conn::Outcome,
    copy::{FIRST_READ, next_read_size},
    kill::KillSwitch,
};
use crate::capture::splice::{Joined, Side, Splice};

/// How long a connection is relayed in userspace before it is joined in the kernel. Joining and
/// parting cost a handful of syscalls and the kernel's per-socket state, which a connection that
/// only lives for one exchange would not win back.
pub const JOIN_AFTER: Duration = Duration::from_millis(5);

/// The kernel carries at most a send buffer per socket between two runs of its work queue, which
/// waits a clock tick whenever the buffer is full: room for a tick of fast local traffic.
const JOINED_SNDBUF: usize = 4 << 20;

/// Copies both ways between two TCP streams with half-close carried through (EOF on one side shuts
/// down the other's write half), counting as bytes flow: `sent` is `a` → `b`.
///
/// With `fast`, a connection still open after [`JOIN_AFTER`] is joined in the kernel (the same-node
/// fast path) at the first moment both receive queues are empty and neither direction is in the
/// middle of a write: the kernel's verdict takes whole socket buffers, and one userspace had read in
/// part would be sent again from its start. From then on a read here returns only the end of stream
/// (or bytes the kernel could not redirect, relayed in order), which is carried on once the kernel
/// has handed over every byte before it. If joining fails the relay goes on in userspace.
pub async fn splice(
    mut a: TcpStream,
    mut b: TcpStream,
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
        joined: OnceLock::new(),
        stats,
    };
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let up = pump(&pair, Side::A, &mut ar, &mut bw);
    let down = pump(&pair, Side::B, &mut br, &mut aw);
    // Either direction failing ends both: the sockets are dropped together when this returns.
    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(drop),
        () = kill.killed() => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by a policy change",
        )),
    };
    if result.is_ok() {
        pair.check_accounting();
    }
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
    /// other one waits for bytes, and neither socket has unread bytes queued.
    fn maybe_join(&self, from: Side) {
        let Some(splice) = &self.splice else { return };
        if self.joined.get().is_some() || Instant::now() < self.join_at {
            return;
        }
        let other = 1 - Self::index(from);
        if !self.idle[other].load(Ordering::Relaxed) || self.fds.iter().any(|fd| queued(*fd) != 0) {
            return;
        }
        // SAFETY: both descriptors belong to streams that outlive the relay.
        let (sa, sb) = unsafe {
            (
                BorrowedFd::borrow_raw(self.fds[0]),
                BorrowedFd::borrow_raw(self.fds[1]),
            )
        };
        for s in [&sa, &sb] {
            let _ = socket2::SockRef::from(s).set_send_buffer_size(JOINED_SNDBUF);
        }
        let joined = match splice.join(&sa, &sb, self.quiet_side(from)) {
            Ok(j) => {
                let j = Arc::new(j);
                self.stats.add_kernel(j.clone());
                Some(JoinedAt {
                    joined: j,
                    user: self.stats.in_user(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "same-node fast path not used for this connection");
                None
            }
        };
        let _ = self.joined.set(joined);
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
        for (to, user) in [(Side::B, sent - at_join.0), (Side::A, received - at_join.1)] {
            // SAFETY: the descriptor belongs to a stream that outlives the relay.
            let sock = unsafe { BorrowedFd::borrow_raw(self.fds[Self::index(to)]) };
            match joined.surplus(to, &sock, user) {
                Ok(0) => {}
                Ok(surplus) => {
                    let (ab, ba) = joined.redirected();
                    tracing::error!(
                        side = ?to,
                        surplus,
                        user_since_join = user,
                        redirected_ab = ab,
                        redirected_ba = ba,
                        "same-node fast path: a socket was given bytes the relay did not account for"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "checking the fast path's byte accounting"),
            }
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

    /// Before carrying an end of stream into `to`: waits until the kernel has handed `to` every byte
    /// it redirected into it (see [`Joined::drained`]).
    async fn drained(&self, to: Side) -> io::Result<()> {
        let Some(Some(JoinedAt {
            joined,
            user: at_join,
        })) = self.joined.get()
        else {
            return Ok(());
        };
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
        while !joined.drained(to, &sock, user())? {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Unread bytes in a socket's receive queue (`FIONREAD`); on error, as if some were queued.
fn queued(fd: RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc != 0 { 1 } else { n }
}

/// Copies what `from` receives (`r`) into the other socket (`w`) until end of stream.
async fn pump(
    pair: &Pair<'_>,
    from: Side,
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
) -> io::Result<()> {
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
        let n = n?;
        if n == 0 {
            pair.drained(to).await?;
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        match from {
            Side::A => pair.stats.add_sent(n),
            Side::B => pair.stats.add_received(n),
        }
        want = next_read_size(want, n);
        pair.maybe_join(from);
    }
}
