//! Outbound: a pod's captured connect, accepted on the agent's listener inside the pod's netns.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{
    CopyStats, PodCtx, TunnelError,
    copy::{FIRST_READ, next_read_size},
    conn::{ConnRecord, Direction, Ends, Outcome},
    connect_in,
    conns::PolicyInput,
    deliver,
    kill::KillSwitch,
    mesh::{Mesh, Route},
    reset,
};
use crate::{
    capture::splice::{Joined, Side, Splice},
    config::OutboundUnknown,
};

pub async fn handle(
    mesh: &Mesh,
    pod: &PodCtx,
    app: TcpStream,
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
) {
    let Some(dst) = orig_dst else {
        // Fail closed: without its destination the connection cannot go anywhere correct.
        let rec = ConnRecord::new(Direction::Outbound, pod.name.clone(), peer, peer);
        reset(app);
        rec.finish(Outcome::Refused("original destination not found".into()));
        return;
    };
    // The app's socket talks to the agent over loopback; the log shows the pod's address as the
    // network would see it, with the app's port.
    let src = SocketAddr::new(pod.ip_like(dst.ip()).unwrap_or(peer.ip()), peer.port());
    let mut rec = ConnRecord::new(Direction::Outbound, pod.name.clone(), src, dst);
    let set = mesh.workloads();
    match mesh.route(&set, dst) {
        Route::External => match mesh.outbound_unknown {
            OutboundUnknown::Refuse => {
                rec.route = "refused";
                reset(app);
                rec.finish(Outcome::Refused("destination outside the mesh".into()));
            }
            OutboundUnknown::Passthrough => {
                rec.route = "passthrough";
                match connect_in(&pod.netns, dst).await {
                    Ok(upstream) => {
                        let ends = Ends {
                            src: Ends::workload(&pod.name),
                            src_principal: pod.identity.as_ref().map(|i| i.principal()),
                            dst: mesh.workload_at(dst.ip()),
                            ..Ends::default()
                        };
                        rec.track(&mesh.metrics, &ends);
                        let reg = mesh.conns.register(rec.live(None));
                        rec.finish(
                            splice(app, upstream, &reg.entry.stats, &reg.entry.kill, None).await,
                        )
                    }
                    Err(e) => {
                        reset(app);
                        rec.finish(Outcome::Unreachable(e.to_string()));
                    }
                }
            }
        },
        Route::SameNode(dst_pod) => {
            rec.route = "same-node";
            rec.peer = dst_pod.identity.as_ref().map(ToString::to_string);
            let decision = mesh.authorize(pod.identity.as_ref(), src.ip(), &dst_pod.name, dst);
            rec.decision = Some(decision.to_string());
            if !decision.allowed() {
                reset(app);
                return rec.finish(Outcome::Refused(decision.to_string()));
            }
            let src_ip = pod.ip_like(dst.ip());
            match deliver(&mesh.capture, &dst_pod, src_ip, dst).await {
                Ok(upstream) => {
                    let policy = PolicyInput {
                        source: pod.identity.clone(),
                        source_ip: src.ip(),
                        destination: dst_pod.name.clone(),
                        destination_addr: dst,
                    };
                    let ends = Ends {
                        src: Ends::workload(&pod.name),
                        src_principal: pod.identity.as_ref().map(|i| i.principal()),
                        dst: Ends::workload(&dst_pod.name),
                        dst_principal: dst_pod.identity.as_ref().map(|i| i.principal()),
                        mutual_tls: false,
                    };
                    rec.track(&mesh.metrics, &ends);
                    let reg = mesh.conns.register(rec.live(Some(policy)));
                    let fast = mesh.capture.splice();
                    rec.finish(splice(app, upstream, &reg.entry.stats, &reg.entry.kill, fast).await)
                }
                Err(e) => {
                    reset(app);
                    rec.finish(Outcome::Unreachable(e.to_string()));
                }
            }
        }
        Route::Hbone { workload, identity } => {
            rec.route = "hbone";
            rec.peer = Some(identity.to_string());
            let ends = Ends {
                src: Ends::workload(&pod.name),
                src_principal: pod.identity.as_ref().map(|i| i.principal()),
                dst: Some((workload.namespace.clone(), workload.name.clone())),
                dst_principal: Some(identity.principal()),
                mutual_tls: true,
            };
            let client = match mesh.hbone_client(pod, dst.ip(), identity).await {
                Ok(c) => c,
                Err(e) => {
                    reset(app);
                    return rec.finish(Outcome::Unreachable(e.to_string()));
                }
            };
            let forwarded =
                SocketAddr::new(pod.ip_like(dst.ip()).unwrap_or(peer.ip()), peer.port());
            let stream = match client.connect(dst, forwarded).await {
                Ok(s) => s,
                Err(e) => {
                    reset(app);
                    let outcome = match e {
                        TunnelError::Denied => {
                            Outcome::Refused("denied by the destination's policy (401)".into())
                        }
                        other => Outcome::Unreachable(other.to_string()),
                    };
                    return rec.finish(outcome);
                }
            };
            let _ = app.set_nodelay(true);
            rec.track(&mesh.metrics, &ends);
            let reg = mesh.conns.register(rec.live(None));
            let stats = &reg.entry.stats;
            let outcome = match stream.relay(app, stats).await {
                Ok(o) => Outcome::Closed {
                    sent: o.sent,
                    received: o.received,
                },
                Err(e) => Outcome::Error {
                    sent: stats.sent(),
                    received: stats.received(),
                    error: e.to_string(),
                },
            };
            rec.finish(outcome);
        }
    }
}

/// Copies both ways between two TCP streams with half-close carried through (EOF on one side shuts
/// down the other's write half), counting as bytes flow: `sent` is `a` → `b`.
///
/// With `fast`, the two sockets are first joined in the kernel (the same-node fast path): their bytes
/// then flow without crossing userspace, and userspace only waits for each end of stream (a read of 0
/// bytes) to carry it on once the kernel has handed over every byte before it. If joining fails the
/// relay runs in userspace.
pub async fn splice(
    mut a: TcpStream,
    mut b: TcpStream,
    stats: &CopyStats,
    kill: &KillSwitch,
    fast: Option<&Arc<Splice>>,
) -> Outcome {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let joined = fast.and_then(|s| match s.join(&a, &b) {
        Ok(j) => Some(Arc::new(j)),
        Err(e) => {
            tracing::warn!(error = %e, "same-node fast path not used for this connection");
            None
        }
    });
    if let Some(j) = &joined {
        stats.add_kernel(j.clone());
    }
    let (fd_a, fd_b) = (a.as_raw_fd(), b.as_raw_fd());
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let drained = |to: Side| {
        let joined = joined.clone();
        let fd = if to == Side::A { fd_a } else { fd_b };
        async move {
            let Some(j) = joined else { return Ok(()) };
            wait_drained(&j, to, fd, || {
                let (sent, received) = stats.in_user();
                if to == Side::B { sent } else { received }
            })
            .await
        }
    };
    let up = pump(&mut ar, &mut bw, |n| stats.add_sent(n), drained(Side::B));
    let down = pump(
        &mut br,
        &mut aw,
        |n| stats.add_received(n),
        drained(Side::A),
    );
    // Either direction failing ends both: the sockets are dropped together when this returns.
    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r,
        () = kill.killed() => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed by a policy change",
        )),
    };
    stats.settle_kernel();
    match result {
        Ok(_) => Outcome::Closed {
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

/// Waits until the kernel has handed `to` every byte it redirected into it (see [`Joined::drained`]).
async fn wait_drained(
    joined: &Joined,
    to: Side,
    fd: RawFd,
    user: impl Fn() -> u64,
) -> std::io::Result<()> {
    // SAFETY: the descriptor belongs to a stream the caller keeps open while this runs.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut pause = std::time::Duration::from_micros(50);
    while !joined.drained(to, &sock, user())? {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
    Ok(())
}

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    count: impl Fn(usize),
    before_shutdown: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Not zero-filled and grown only while reads come back full: on the fast path userspace only
    // ever sees the end of stream, and an idle connection keeps a small buffer.
    let mut buf = Vec::new();
    let mut want = FIRST_READ;
    loop {
        buf.clear();
        buf.reserve(want);
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            before_shutdown.await?;
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        count(n);
        want = next_read_size(want, n);
    }
}
