//! Delivering a connection to an app so that it sees the real client address, without iptables.
//!
//! The agent connects to the app from a socket inside the pod's netns that is bound to the original
//! client address (`IP_TRANSPARENT` allows binding an address the netns does not own) and carries a mark.
//! The app's replies go to that foreign address, so on their own they would leave the pod; with
//! `tcp_fwmark_accept` the accepted socket inherits the mark, and a policy rule sends marked traffic to a
//! table whose only route is `local 0/0 dev lo`, which hands the replies back to the agent's socket.
//!
//! The netns is configured over rtnetlink and procfs directly: the agent's image has no `ip` binary.
use std::{
    ffi::CStr,
    fmt, io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use super::{Netns, NetnsError, RunError};

/// The mark Ferry's delivery sockets carry unless configured otherwise.
pub const DEFAULT_MARK: u32 = 0x539;
/// The routing table holding the `local` route unless configured otherwise.
pub const DEFAULT_TABLE: u32 = 100;
/// Preference of the rule Ferry adds: any value below the `main` lookup (32766) works; a fixed one keeps
/// a repeated `prepare_transparent` recognisable and `ip rule` output predictable.
pub const RULE_PRIORITY: u32 = 100;

/// Preference of the `main` table lookup in a fresh netns: a matching rule after it would never be reached
/// for the replies, which the main table routes out of the pod.
const MAIN_RULE_PRIORITY: u32 = 32766;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const FWMARK_REFLECT_V4: &str = "/proc/sys/net/ipv4/fwmark_reflect";
const FWMARK_REFLECT_V6: &str = "/proc/sys/net/ipv6/fwmark_reflect";
const LO_DISABLE_IPV6: &str = "/proc/sys/net/ipv6/conf/lo/disable_ipv6";
/// A kernel that never answers would otherwise hang the calling thread forever.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump interrupted by a concurrent change is redone; past this many tries something keeps changing.
const DUMP_TRIES: usize = 5;

// Netlink and rtnetlink constants missing from `libc`, from the kernel's uapi headers
// (linux/netlink.h, linux/fib_rules.h, linux/rtnetlink.h).
const NLMSG_HDRLEN: usize = 16;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 0x2;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_FLOW: u16 = 11;
const FRA_SUPPRESS_IFGROUP: u16 = 13;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_PAD: u16 = 18;
const FRA_PROTOCOL: u16 = 21;

const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;

/// Tables a `local 0/0` route must never go into: it would capture every packet of the pod.
const RESERVED_TABLES: [u32; 4] = [
    libc::RT_TABLE_UNSPEC as u32,
    libc::RT_TABLE_DEFAULT as u32,
    libc::RT_TABLE_MAIN as u32,
    libc::RT_TABLE_LOCAL as u32,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot {op}: {source}")]
    Netns {
        op: String,
        #[source]
        source: NetnsError,
    },
    #[error("cannot {op} in network namespace {path}: {source}")]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused to {op} in network namespace {path}: {source}{}",
        .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Kernel {
        path: PathBuf,
        op: String,
        #[source]
        source: io::Error,
        /// The kernel's extended ack message, when it gave one.
        detail: Option<String>,
    },
    #[error("malformed rtnetlink reply to {op} in network namespace {path}: {what}")]
    Malformed {
        path: PathBuf,
        op: String,
        what: &'static str,
    },
    #[error(
        "network namespace {path}: table {table} already has a default {family} route that is not \
         `local` on lo; refusing to replace it"
    )]
    ConflictingRoute {
        path: PathBuf,
        family: Family,
        table: u32,
    },
    #[error("invalid transparent delivery setup for network namespace {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// Makes `ns` route traffic marked `mark` (the replies to Ferry's transparent delivery sockets) back to
/// the local stack through `table`. Safe to repeat: existing identical rules and routes are kept, never
/// duplicated. IPv6 is skipped when it is disabled in `ns`.
pub fn prepare_transparent(ns: &Netns, mark: u32, table: u32) -> Result<(), RouteError> {
    if mark == 0 {
        // A rule `fwmark 0` matches every unmarked packet: all of the pod's traffic would loop back.
        return Err(RouteError::Invalid {
            path: ns.path().to_owned(),
            what: "mark 0 would match all unmarked traffic".into(),
        });
    }
    if RESERVED_TABLES.contains(&table) {
        return Err(RouteError::Invalid {
            path: ns.path().to_owned(),
            what: format!("table {table} is one of the kernel's own tables"),
        });
    }

    // /proc/sys/net resolves the netns of the thread that opens the file, so the write must happen
    // inside. The IPv4 knob also covers IPv6 TCP: both use it to mark request sockets.
    run_in(ns, "enable net.ipv4.tcp_fwmark_accept", || {
        std::fs::write(FWMARK_ACCEPT, b"1")
    })?;
    // Replies the kernel makes itself (a RST for a port nobody listens on, ICMP errors) must carry the
    // mark too, or they leave the pod for the client's real address and the delivery hangs.
    run_in(ns, "enable net.ipv4.fwmark_reflect", || {
        std::fs::write(FWMARK_REFLECT_V4, b"1")
    })?;
    let lo = run_in(ns, "look up the ifindex of lo", || {
        // SAFETY: the argument is a NUL-terminated string.
        match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
            0 => Err(io::Error::last_os_error()),
            i => Ok(i),
        }
    })?;
    let v6 = run_in(ns, "check whether IPv6 is enabled", ipv6_enabled)?;

    let mut rtnl = Rtnl::open(ns)?;
    let families: &[Family] = if v6 {
        &[Family::V4, Family::V6]
    } else {
        tracing::debug!(netns = %ns.path().display(), "IPv6 disabled: transparent delivery set up for IPv4 only");
        &[Family::V4]
    };
    if v6 {
        run_in(ns, "enable net.ipv6.fwmark_reflect", || {
            std::fs::write(FWMARK_REFLECT_V6, b"1")
        })?;
    }
    for &family in families {
        ensure_rule(&mut rtnl, family, mark, table)?;
        ensure_local_route(&mut rtnl, family, table, lo)?;
    }
    Ok(())
}

/// A non-blocking TCP socket inside `ns`, bound to `(src, 0)` although `src` is not an address of `ns`,
/// and marked so that `prepare_transparent`'s rule routes the peer's replies back to it. Unconnected: the
/// caller reads `local_addr()` first.
pub fn transparent_socket(ns: &Netns, src: IpAddr, mark: u32) -> io::Result<socket2::Socket> {
    let sock = ns.tcp_socket(src.is_ipv6())?;
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "{what} on a delivery socket in network namespace {}: {e}",
                ns.path().display()
            ),
        )
    };
    match src {
        IpAddr::V4(_) => sock.set_ip_transparent_v4(true),
        IpAddr::V6(_) => sock.set_ip_transparent_v6(true),
    }
    .map_err(|e| ctx("set IP_TRANSPARENT", e))?;
    sock.set_mark(mark).map_err(|e| ctx("set SO_MARK", e))?;
    sock.bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| ctx(&format!("bind {src}"), e))?;
    Ok(sock)
}

fn run_in<T>(ns: &Netns, op: &str, f: impl FnOnce() -> io::Result<T>) -> Result<T, RouteError> {
    ns.run(f).map_err(|e| match e {
        // setns on a namespace file of another kind fails with EINVAL.
        RunError::Enter(NetnsError::Enter {
            path,
            source: nix::Error::EINVAL,
        }) => RouteError::Netns {
            op: op.to_owned(),
            source: NetnsError::NotNetns { path },
        },
        RunError::Enter(source) => RouteError::Netns {
            op: op.to_owned(),
            source,
        },
        RunError::Inner(source) => RouteError::Io {
            path: ns.path().to_owned(),
            op: op.to_owned(),
            source,
        },
    })
}

/// Runs inside the netns. Without the ipv6 module the file is missing; `disable_ipv6` on lo means the
/// kernel refuses IPv6 routes through it.
fn ipv6_enabled() -> io::Result<bool> {
    match std::fs::read_to_string(LO_DISABLE_IPV6) {
        Ok(v) => Ok(v.trim() == "0"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn ensure_rule(rtnl: &mut Rtnl, family: Family, mark: u32, table: u32) -> Result<(), RouteError> {
    // The kernel adds identical rules again and again unless asked for NLM_F_EXCL, and even then only an
    // exact duplicate (same preference) counts: so look for an equivalent rule first.
    let op = format!("list {family} rules");
    let rules = rtnl.dump(&op, libc::RTM_GETRULE, &fib_rule_hdr(family))?;
    for msg in &rules {
        if rule_matches(msg, family, mark, table).map_err(|what| rtnl.malformed(&op, what))? {
            return Ok(());
        }
    }

    let op = format!("add {family} rule fwmark {mark:#x} lookup {table}");
    let mut body = fib_rule_hdr(family);
    put_attr(&mut body, FRA_FWMARK, &mark.to_ne_bytes());
    put_attr(&mut body, FRA_FWMASK, &u32::MAX.to_ne_bytes());
    put_attr(&mut body, FRA_TABLE, &table.to_ne_bytes());
    put_attr(&mut body, FRA_PRIORITY, &RULE_PRIORITY.to_ne_bytes());
    let flags = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    match rtnl.request(&op, libc::RTM_NEWRULE, flags, &body) {
        // Someone added the very same rule since the dump.
        Err(RouteError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            Ok(())
        }
        other => other,
    }
}

fn fib_rule_hdr(family: Family) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32).
    let mut h = vec![family.af(), 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL];
    h.extend_from_slice(&0u32.to_ne_bytes());
    h
}

/// Whether a dumped rule does what Ferry's rule does: sends exactly the packets marked `mark` to `table`,
/// before the main table is consulted, and nothing else.
fn rule_matches(
    msg: &OwnedMsg,
    family: Family,
    mark: u32,
    table: u32,
) -> Result<bool, &'static str> {
    if msg.ty != libc::RTM_NEWRULE {
        return Ok(false);
    }
    let p = &msg.payload[..];
    if p.len() < 12 {
        return Err("rule message shorter than its header");
    }
    let (af, dst_len, src_len, tos, hdr_table, action) = (p[0], p[1], p[2], p[3], p[4], p[7]);
    let flags = u32::from_ne_bytes([p[8], p[9], p[10], p[11]]);
    if af != family.af()
        || dst_len != 0
        || src_len != 0
        || tos != 0
        || action != FR_ACT_TO_TBL
        || flags & FIB_RULE_INVERT != 0
    {
        return Ok(false);
    }
    let (mut fwmark, mut fwmask, mut rule_table, mut prio) =
        (None, u32::MAX, u32::from(hdr_table), 0);
    for (ty, v) in attrs(&p[12..])? {
        match ty {
            FRA_FWMARK => fwmark = Some(attr_u32(v)?),
            FRA_FWMASK => fwmask = attr_u32(v)?,
            FRA_TABLE => rule_table = attr_u32(v)?,
            FRA_PRIORITY => prio = attr_u32(v)?,
            // Reported for every rule; only a value other than "unset" changes what the rule does.
            FRA_SUPPRESS_PREFIXLEN | FRA_SUPPRESS_IFGROUP => {
                if attr_u32(v)? != u32::MAX {
                    return Ok(false);
                }
            }
            FRA_PROTOCOL | FRA_PAD | FRA_FLOW => {}
            // Any other attribute is a further selector (addresses, interfaces, ports, uid...): the rule
            // then catches less than Ferry needs.
            _ => return Ok(false),
        }
    }
    Ok(fwmark == Some(mark)
        && fwmask == u32::MAX
        && rule_table == table
        && prio < MAIN_RULE_PRIORITY)
}

fn ensure_local_route(
    rtnl: &mut Rtnl,
    family: Family,
    table: u32,
    lo: u32,
) -> Result<(), RouteError> {
    let op = format!("add {family} route local default dev lo table {table}");
    let mut body = rtmsg(family, table);
    put_attr(&mut body, RTA_TABLE, &table.to_ne_bytes());
    put_attr(&mut body, RTA_OIF, &lo.to_ne_bytes());
    let flags = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    match rtnl.request(&op, libc::RTM_NEWROUTE, flags, &body) {
        // EEXIST only says the table has *a* default route with this metric; make sure it is ours.
        Err(RouteError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            let op = format!("list {family} routes");
            let routes = rtnl.dump(&op, libc::RTM_GETROUTE, &rtmsg(family, table))?;
            for msg in &routes {
                if local_default_route(msg, family, table, lo)
                    .map_err(|what| rtnl.malformed(&op, what))?
                {
                    return Ok(());
                }
            }
            Err(RouteError::ConflictingRoute {
                path: rtnl.path.clone(),
                family,
                table,
            })
        }
        other => other,
    }
}

fn rtmsg(family: Family, table: u32) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32). The header
    // holds only 8-bit tables; RTA_TABLE carries the real one.
    let hdr_table = u8::try_from(table).unwrap_or(libc::RT_TABLE_UNSPEC);
    let mut m = vec![
        family.af(),
        0,
        0,
        0,
        hdr_table,
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ];
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
}

fn local_default_route(
    msg: &OwnedMsg,
    family: Family,
    table: u32,
    lo: u32,
) -> Result<bool, &'static str> {
    if msg.ty != libc::RTM_NEWROUTE {
        return Ok(false);
    }
    let p = &msg.payload[..];
    if p.len() < 12 {
        return Err("route message shorter than its header");
    }
    let (af, dst_len, src_len, tos, hdr_table, rtype) = (p[0], p[1], p[2], p[3], p[4], p[7]);
    if af != family.af() || dst_len != 0 || src_len != 0 || tos != 0 || rtype != libc::RTN_LOCAL {
        return Ok(false);
    }
    let (mut route_table, mut oif) = (u32::from(hdr_table), None);
    for (ty, v) in attrs(&p[12..])? {
        match ty {
            RTA_TABLE => route_table = attr_u32(v)?,
            RTA_OIF => oif = Some(attr_u32(v)?),
            _ => {}
        }
    }
    Ok(route_table == table && oif == Some(lo))
}

/// A NETLINK_ROUTE socket living in one netns: once created there, it talks to that netns's routing
/// whichever thread uses it.
struct Rtnl {
    fd: OwnedFd,
    path: PathBuf,
    seq: u32,
}

struct Msg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

impl Rtnl {
    fn open(ns: &Netns) -> Result<Self, RouteError> {
        let fd = run_in(ns, "open a rtnetlink socket", || {
            // SAFETY: plain syscall; the result is checked before use.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just created and is owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        let rtnl = Self {
            fd,
            path: ns.path().to_owned(),
            seq: 0,
        };
        // Best effort: extended acks only improve error messages, and capped acks keep them short.
        let _ = rtnl.setsockopt(libc::SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = rtnl.setsockopt(libc::SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let tv = libc::timeval {
            tv_sec: NETLINK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: the pointer and length describe a valid timeval.
        let rc = unsafe {
            libc::setsockopt(
                rtnl.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(rtnl.io(
                "set a receive timeout on the rtnetlink socket",
                io::Error::last_os_error(),
            ));
        }
        Ok(rtnl)
    }

    fn setsockopt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        val: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: the pointer and length describe a valid c_int.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn io(&self, op: &str, source: io::Error) -> RouteError {
        RouteError::Io {
            path: self.path.clone(),
            op: op.to_owned(),
            source,
        }
    }

    fn malformed(&self, op: &str, what: &'static str) -> RouteError {
        RouteError::Malformed {
            path: self.path.clone(),
            op: op.to_owned(),
            what,
        }
    }

    fn send(&mut self, op: &str, ty: u16, flags: u16, body: &[u8]) -> Result<u32, RouteError> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        // Port id 0: the kernel fills in ours.
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // An unbound netlink socket sends to the kernel by default, and is bound automatically.
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(self.io(op, io::Error::last_os_error()));
        }
        if n as usize != msg.len() {
            return Err(self.io(op, io::Error::other("short send on the rtnetlink socket")));
        }
        Ok(self.seq)
    }

    /// One datagram, however large.
    fn recv(&self, op: &str) -> Result<Vec<u8>, RouteError> {
        loop {
            // MSG_TRUNC makes netlink report the full datagram length even with a zero-length buffer.
            // SAFETY: a zero-length read touches no memory.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_PEEK | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io(op, e));
            }
            let mut buf = vec![0u8; n as usize];
            // SAFETY: the buffer is valid for its length.
            let m =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io(op, e));
            }
            buf.truncate(m as usize);
            return Ok(buf);
        }
    }

    /// Sends a request and waits for the kernel's ack.
    fn request(&mut self, op: &str, ty: u16, flags: u16, body: &[u8]) -> Result<(), RouteError> {
        let seq = self.send(op, ty, flags | libc::NLM_F_ACK as u16, body)?;
        loop {
            let buf = self.recv(op)?;
            for msg in split(&buf).map_err(|what| self.malformed(op, what))? {
                if msg.seq != seq || msg.ty != libc::NLMSG_ERROR as u16 {
                    continue;
                }
                return self.check_error(op, &msg);
            }
        }
    }

    /// Sends a dump request and collects every reply message (as owned copies).
    fn dump(&mut self, op: &str, ty: u16, body: &[u8]) -> Result<Vec<OwnedMsg>, RouteError> {
        for _ in 0..DUMP_TRIES {
            let seq = self.send(op, ty, libc::NLM_F_DUMP as u16, body)?;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let buf = self.recv(op)?;
                for msg in split(&buf).map_err(|what| self.malformed(op, what))? {
                    if msg.seq != seq {
                        continue;
                    }
                    interrupted |= msg.flags & NLM_F_DUMP_INTR != 0;
                    match i32::from(msg.ty) {
                        libc::NLMSG_DONE => {
                            // A dump that failed part-way reports its errno in NLMSG_DONE.
                            if let Some(e) = msg.payload.get(..4) {
                                let e = i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
                                if e < 0 {
                                    return Err(self.kernel(op, -e, None));
                                }
                            }
                            break 'recv;
                        }
                        libc::NLMSG_ERROR => {
                            self.check_error(op, &msg)?;
                            break 'recv;
                        }
                        libc::NLMSG_NOOP => {}
                        _ => out.push(OwnedMsg {
                            ty: msg.ty,
                            payload: msg.payload.to_vec(),
                        }),
                    }
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(self.io(
            op,
            io::Error::other("the dump kept being interrupted by concurrent changes"),
        ))
    }

    fn kernel(&self, op: &str, errno: i32, detail: Option<String>) -> RouteError {
        RouteError::Kernel {
            path: self.path.clone(),
            op: op.to_owned(),
            source: io::Error::from_raw_os_error(errno),
            detail,
        }
    }

    /// NLMSG_ERROR: errno 0 is an ack.
    fn check_error(&self, op: &str, msg: &Msg<'_>) -> Result<(), RouteError> {
        let p = msg.payload;
        let Some(e) = p.get(..4) else {
            return Err(self.malformed(op, "error message without an errno"));
        };
        let errno = -i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
        if errno == 0 {
            return Ok(());
        }
        Err(self.kernel(op, errno, ext_ack_message(msg)))
    }
}

/// A message of a dump, copied out of its datagram.
struct OwnedMsg {
    ty: u16,
    payload: Vec<u8>,
}

/// The human-readable reason an extended ack carries, if any.
fn ext_ack_message(msg: &Msg<'_>) -> Option<String> {
    if msg.flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // The errno, then the request's header, then (unless capped) the rest of the request.
    let orig_len = msg
        .payload
        .get(4..8)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))?;
    let tlv_start = if msg.flags & NLM_F_CAPPED != 0 {
        4 + NLMSG_HDRLEN
    } else {
        4 + align4(orig_len as usize)
    };
    let tlvs = attrs(msg.payload.get(tlv_start..)?).ok()?;
    let (_, text) = tlvs.into_iter().find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)?;
    let text = CStr::from_bytes_until_nul(text)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(text).into_owned());
    Some(text)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The messages of one datagram, checked against its bounds.
fn split(buf: &[u8]) -> Result<Vec<Msg<'_>>, &'static str> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HDRLEN {
            return Err("truncated message header");
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err("message length out of bounds");
        }
        out.push(Msg {
            ty: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            payload: &rest[NLMSG_HDRLEN..len],
        });
        rest = rest.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

/// Attributes as (type, value), checked against their bounds.
fn attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, &'static str> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err("attribute length out of bounds");
        }
        out.push((ty, &buf[4..len]));
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

fn attr_u32(v: &[u8]) -> Result<u32, &'static str> {
    match v {
        [a, b, c, d] => Ok(u32::from_ne_bytes([*a, *b, *c, *d])),
        _ => Err("32-bit attribute of the wrong size"),
    }
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        hash::{BuildHasher, RandomState},
        io::{Read, Write},
        net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
        path::Path,
        process::Command,
        sync::Arc,
        time::Instant,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const APP4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 9, 10)), 7000);
    const APP6: SocketAddr = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 0x10)),
        7000,
    );
    const CLIENT4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
    const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 5));
    const FWMARK_RULE: &str = "fwmark 0x539 lookup 100";

    fn sh(args: &[&str]) -> String {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes the test netns however the test ends, panics included.
    struct NsGuard(String);

    impl Drop for NsGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    struct TestNs {
        guard: NsGuard,
        ns: Netns,
    }

    impl TestNs {
        /// A netns with lo up and the app's addresses on a veth (this kernel has no dummy driver) whose
        /// peer stays in the same netns.
        fn new() -> Self {
            assert!(
                nix::unistd::geteuid().is_root(),
                "these tests need root (they create network namespaces)"
            );
            let name = format!(
                "ferry-rt-{}-{:08x}",
                std::process::id(),
                RandomState::new().hash_one(Instant::now()) as u32
            );
            sh(&["ip", "netns", "add", &name]);
            let guard = NsGuard(name);
            for cmd in [
                "link set lo up",
                "link add app0 type veth peer name app1",
                "link set app1 up",
                "link set app0 up",
                "addr add 198.18.9.10/24 dev app0",
                "addr add 2001:db8:9::10/64 dev app0 nodad",
            ] {
                guard.ip(cmd);
            }
            let ns = Netns::open(Path::new(&format!("/run/netns/{}", guard.0)))
                .expect("open the test netns");
            Self { guard, ns }
        }

        fn ip(&self, args: &str) -> String {
            self.guard.ip(args)
        }

        fn sysctl(&self, file: &str) -> String {
            sh(&["ip", "netns", "exec", &self.guard.0, "cat", file])
                .trim()
                .to_owned()
        }

        fn count_rules(&self, family: &str) -> usize {
            self.ip(&format!("{family} rule show"))
                .lines()
                .filter(|l| l.contains(FWMARK_RULE))
                .count()
        }
    }

    impl NsGuard {
        fn ip(&self, args: &str) -> String {
            let mut argv = vec!["ip", "-n", &self.0];
            argv.extend(args.split_whitespace());
            sh(&argv)
        }
    }

    /// A listening app inside the netns; non-blocking so a test never waits on it forever.
    fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
        let l = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        l.set_nonblocking(true).expect("non-blocking listener");
        l
    }

    fn accept_within(l: &TcpListener, limit: Duration) -> io::Result<(TcpStream, SocketAddr)> {
        let deadline = Instant::now() + limit;
        loop {
            match l.accept() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// Connects the way the agent does: a transparent socket handed to tokio.
    async fn deliver(
        ns: &Netns,
        src: IpAddr,
        dst: SocketAddr,
        limit: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let sock = transparent_socket(ns, src, DEFAULT_MARK)?;
        let local = sock.local_addr()?.as_socket();
        assert_eq!(local.map(|a| a.ip()), Some(src));
        assert_ne!(local.map(|a| a.port()), Some(0), "bind picks a port");
        let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
        tokio::time::timeout(limit, sock.connect(dst))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }

    async fn app_sees_client(src: IpAddr, dst: SocketAddr) {
        let t = TestNs::new();
        prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE).expect("prepare_transparent");
        let listener = listen(&t.ns, dst);
        let app = std::thread::spawn(move || -> io::Result<SocketAddr> {
            let (mut s, peer) = accept_within(&listener, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            if &buf != b"hello" {
                return Err(io::Error::other(format!("app got {buf:?}")));
            }
            s.write_all(b"world")?;
            Ok(peer)
        });

        let mut conn = deliver(&t.ns, src, dst, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("connect from {src} to {dst}: {e}"));
        let local = conn.local_addr().expect("local address");
        conn.write_all(b"hello").await.expect("send to the app");
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
            .await
            .expect("the app's reply arrives in time")
            .expect("read the app's reply");
        assert_eq!(&buf, b"world");

        let peer = app
            .join()
            .expect("app thread")
            .expect("app accepts and echoes");
        assert_eq!(peer.ip(), src, "the app sees the original client");
        assert_eq!(peer, local);
    }

    #[tokio::test]
    async fn app_sees_the_original_ipv4_client() {
        app_sees_client(CLIENT4, APP4).await;
    }

    #[tokio::test]
    async fn app_sees_the_original_ipv6_client() {
        app_sees_client(CLIENT6, APP6).await;
    }

    /// The same delivery into a netns left as it was: the app's SYN-ACK goes to the client address
    /// through the main table, which has no route for it, so the handshake never completes.
    #[tokio::test]
    async fn without_prepare_the_delivery_does_not_connect() {
        let t = TestNs::new();
        for (src, dst) in [(CLIENT4, APP4), (CLIENT6, APP6)] {
            let listener = listen(&t.ns, dst);
            let res = deliver(&t.ns, src, dst, Duration::from_millis(1500)).await;
            assert!(
                res.is_err(),
                "{src} -> {dst} connected without the rule and route"
            );
            let accepted = accept_within(&listener, Duration::ZERO);
            assert!(
                matches!(&accepted, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "the app accepted {accepted:?}"
            );
        }
        assert_eq!(t.sysctl(FWMARK_ACCEPT), "0");
    }

    #[test]
    fn prepare_twice_leaves_one_rule_and_route_per_family() {
        let t = TestNs::new();
        let host_before = std::fs::read_to_string(FWMARK_ACCEPT).expect("host sysctl");
        prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE).expect("first prepare");
        prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE).expect("second prepare");

        assert_eq!(t.count_rules("-4"), 1, "{}", t.ip("-4 rule show"));
        assert_eq!(t.count_rules("-6"), 1, "{}", t.ip("-6 rule show"));
        assert!(
            t.ip("-4 rule show")
                .contains(&format!("{RULE_PRIORITY}:\tfrom all {FWMARK_RULE}"))
        );
        let r4 = t.ip("-4 route show table 100");
        assert_eq!(
            r4.trim(),
            "local default dev lo proto static scope host",
            "{r4}"
        );
        let r6 = t.ip("-6 route show table 100");
        assert_eq!(r6.lines().count(), 1, "{r6}");
        assert!(r6.starts_with("local default dev lo"), "{r6}");

        // The sysctl changed in the pod's netns only.
        assert_eq!(t.sysctl(FWMARK_ACCEPT), "1");
        let host_after = std::fs::read_to_string(FWMARK_ACCEPT).expect("host sysctl");
        assert_eq!(host_before, host_after);
    }

    /// A rule someone added by hand (kernel-chosen preference, implicit mask) already does the job.
    #[test]
    fn an_equivalent_existing_rule_is_reused() {
        let t = TestNs::new();
        t.ip("-4 rule add fwmark 0x539 lookup 100");
        t.ip("-6 rule add fwmark 0x539 lookup 100");
        prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE).expect("prepare");
        assert_eq!(t.count_rules("-4"), 1, "{}", t.ip("-4 rule show"));
        assert_eq!(t.count_rules("-6"), 1, "{}", t.ip("-6 rule show"));
    }

    /// A rule that only matches part of the marked traffic is not Ferry's rule.
    #[test]
    fn a_narrower_existing_rule_is_not_taken_for_ours() {
        let t = TestNs::new();
        t.ip("-4 rule add fwmark 0x539 iif app0 lookup 100");
        prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE).expect("prepare");
        let rules = t.ip("-4 rule show");
        assert_eq!(rules.matches("fwmark 0x539").count(), 2, "{rules}");
        assert_eq!(t.count_rules("-4"), 1, "{rules}");
    }

    #[test]
    fn a_different_default_route_in_the_table_is_reported() {
        let t = TestNs::new();
        t.ip("-4 route add unreachable default table 100");
        let err = prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE)
            .expect_err("a foreign default route in table 100");
        assert!(
            matches!(
                &err,
                RouteError::ConflictingRoute {
                    family: Family::V4,
                    table: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&t.guard.0), "{err}");
    }

    #[test]
    fn ipv6_disabled_is_skipped() {
        let t = TestNs::new();
        sh(&[
            "ip",
            "netns",
            "exec",
            &t.guard.0,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6",
        ]);
        prepare_transparent(&t.ns, DEFAULT_MARK, DEFAULT_TABLE).expect("prepare without IPv6");
        assert_eq!(t.count_rules("-4"), 1, "{}", t.ip("-4 rule show"));
        assert_eq!(t.count_rules("-6"), 0, "{}", t.ip("-6 rule show"));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let t = TestNs::new();
        for (mark, table) in [
            (0, DEFAULT_TABLE),
            (DEFAULT_MARK, 254),
            (DEFAULT_MARK, 255),
            (DEFAULT_MARK, 0),
        ] {
            let err = prepare_transparent(&t.ns, mark, table).expect_err("refused");
            assert!(matches!(err, RouteError::Invalid { .. }), "{err}");
        }
        assert_eq!(t.count_rules("-4"), 0);
    }

    #[test]
    fn a_path_that_is_not_a_netns_is_named() {
        let missing = Path::new("/run/netns/ferry-rt-does-not-exist");
        let err = Netns::open(missing).expect_err("no such netns").to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");

        // A handle on something else than a netns, as a stale or mistaken path would give.
        for path in ["/proc/self/ns/uts", "/etc/hostname"] {
            let ns = Netns {
                file: Arc::new(File::open(path).expect("open")),
                path: PathBuf::from(path),
            };
            let err =
                prepare_transparent(&ns, DEFAULT_MARK, DEFAULT_TABLE).expect_err("not a netns");
            assert!(
                matches!(&err, RouteError::Netns { source: NetnsError::NotNetns { path: p }, .. } if p == Path::new(path)),
                "{err:?}"
            );
            assert!(err.to_string().contains(path), "{err}");
            let err = transparent_socket(&ns, CLIENT4, DEFAULT_MARK).expect_err("not a netns");
            assert!(err.to_string().contains(path), "{err}");
        }
    }

    #[test]
    fn malformed_netlink_is_an_error() {
        assert!(split(&[0u8; 10]).is_err());
        let mut too_long = vec![0u8; 16];
        too_long[..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(split(&too_long).is_err());
        assert!(attrs(&[8, 0, 1, 0, 0]).is_err());
        assert!(attr_u32(&[1, 2]).is_err());
    }
}
