//! Outbound: a pod's captured connect, accepted on the agent's listener inside the pod's netns.
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{
    CopyStats, PodCtx, TunnelError,
    conn::{ConnRecord, Direction, Ends, Outcome},
    connect_in,
    conns::PolicyInput,
    deliver,
    kill::KillSwitch,
    mesh::{Mesh, Route},
    reset,
};
use crate::config::OutboundUnknown;

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
                        rec.finish(splice(app, upstream, &reg.entry.stats, &reg.entry.kill).await)
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
                    rec.finish(splice(app, upstream, &reg.entry.stats, &reg.entry.kill).await)
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
            let forwarded =
                SocketAddr::new(pod.ip_like(dst.ip()).unwrap_or(peer.ip()), peer.port());
            let mut retried = false;
            let stream = loop {
                // Boxed: opening a connection (TCP, TLS, HTTP/2 handshakes) is this future's largest
                // state, and unboxed it would be part of every connection's task for the
                // connection's whole life (about 6 KiB each), though most connections find a pooled
                // one.
                let client =
                    match Box::pin(mesh.hbone_client(pod, dst.ip(), identity.clone())).await {
                        Ok(c) => c,
                        Err(e) => {
                            reset(app);
                            return rec.finish(Outcome::Unreachable(e.to_string()));
                        }
                    };
                match client.connect(dst, forwarded).await {
                    Ok(s) => break Ok(s),
                    // The pooled connection was going away (its agent handed over or is stopping):
                    // the peer never processed the stream, so one more try on a fresh connection —
                    // which reaches the peer's successor — is safe.
                    Err(TunnelError::Closed) if !retried => retried = true,
                    Err(e) => break Err(e),
                }
            };
            let stream = match stream {
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
pub async fn splice(
    mut a: TcpStream,
    mut b: TcpStream,
    stats: &CopyStats,
    kill: &KillSwitch,
) -> Outcome {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let up = pump(&mut ar, &mut bw, |n| stats.add_sent(n));
    let down = pump(&mut br, &mut aw, |n| stats.add_received(n));
    // Either direction failing ends both: the sockets are dropped together when this returns.
    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r,
        () = kill.killed() => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed by a policy change",
        )),
    };
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

async fn pump<R, W>(r: &mut R, w: &mut W, count: impl Fn(usize)) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Small first, grown while reads fill it (as in copy.rs): the zeroed buffer is resident at once.
    let mut buf = vec![0u8; super::copy::FIRST_READ];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        count(n);
        let size = super::copy::next_read_size(buf.len(), n);
        if size > buf.len() {
            buf.resize(size, 0);
        }
    }
}
