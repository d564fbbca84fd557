//! Outbound: a pod's captured connect, accepted on the agent's listener inside the pod's netns.
use std::{net::SocketAddr, os::fd::AsRawFd};

use bytes::Bytes;
use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{
    CopyOutcome, PodCtx, TunnelError,
    conn::{ConnRecord, Direction, Ends, Outcome},
    connect_in,
    conns::{PolicyInput, Registered},
    copy::Relay,
    deliver,
    hbone_client::StreamSlot,
    mesh::{Mesh, Route},
    reset,
    splice::splice,
};
use crate::config::OutboundUnknown;

/// The connection's task lives as long as the connection, sized by its largest state. Everything up to
/// the relay of a tunnelled connection (routing, policy, TCP and TLS handshakes, the CONNECT exchange)
/// runs boxed and is freed before relaying starts, so an idle tunnelled connection holds only its
/// record and the relay's own state. Connections of the other routes are relayed inside the box.
pub async fn handle(
    mesh: &Mesh,
    pod: &PodCtx,
    app: TcpStream,
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
) {
    let open = Box::pin(open(mesh, pod, app, peer, orig_dst));
    // `let else`, not `if let`: the scrutinee of an `if let` would stay in the task beside the
    // binding for as long as the relay runs.
    let Some(mut tunnelled) = open.await else {
        return;
    };
    let result = (&mut tunnelled.relay).await;
    tunnelled.finish(result);
}

/// A connection carried over HBONE, relaying.
struct Tunnelled {
    rec: ConnRecord,
    reg: Registered,
    relay: Relay<TcpStream, StreamSlot>,
}

impl Tunnelled {
    fn finish(self, result: Result<CopyOutcome, TunnelError>) {
        let Tunnelled { rec, reg, relay } = self;
        // The app's socket closes before the connection is logged, as when the relay owned it.
        drop(relay);
        let stats = &reg.entry.stats;
        rec.finish(match result {
            Ok(o) => Outcome::Closed {
                sent: o.sent,
                received: o.received,
            },
            Err(e) => Outcome::Error {
                sent: stats.sent(),
                received: stats.received(),
                error: e.to_string(),
            },
        });
    }
}

/// Routes the connection and opens its way there: the relay to run for a tunnelled connection, or
/// `None` once a connection of another route was refused or has been relayed to its end.
async fn open(
    mesh: &Mesh,
    pod: &PodCtx,
    mut app: TcpStream,
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
) -> Option<Tunnelled> {
    let Some(dst) = orig_dst else {
        // Fail closed: without its destination the connection cannot go anywhere correct.
        let rec = ConnRecord::new(Direction::Outbound, pod.name.clone(), peer, peer);
        reset(app);
        rec.finish(Outcome::Refused("original destination not found".into()));
        return None;
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
                match Box::pin(connect_in(&pod.netns, dst)).await {
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
                rec.finish(Outcome::Refused(decision.to_string()));
                return None;
            }
            let src_ip = pod.ip_like(dst.ip());
            match Box::pin(deliver(&mesh.capture, &dst_pod, src_ip, dst)).await {
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
            let forwarded =
                SocketAddr::new(pod.ip_like(dst.ip()).unwrap_or(peer.ip()), peer.port());
            let mut retried = false;
            let stream = loop {
                // Boxed: opening a connection (TCP, TLS, HTTP/2 handshakes) is by far the largest
                // state of this set-up, and most connections find a pooled one.
                let client =
                    match Box::pin(mesh.hbone_client(pod, dst.ip(), identity.clone())).await {
                        Ok(c) => c,
                        Err(e) => {
                            reset(app);
                            rec.finish(Outcome::Unreachable(e.to_string()));
                            return None;
                        }
                    };
                // Peeked, not read: the bytes leave the app's socket only once the peer took the
                // stream, so a refused stream that is tried again loses none of them.
                let early = peek_early(&app);
                match client
                    .connect_with_early_data(dst, forwarded, early.clone())
                    .await
                {
                    Ok(s) => break Ok((s, early.len())),
                    // The pooled connection was going away (its agent handed over or is stopping):
                    // the peer never processed the stream, so one more try on a fresh connection —
                    // which reaches the peer's successor — is safe.
                    Err(TunnelError::Closed) if !retried => retried = true,
                    Err(e) => break Err(e),
                }
            };
            let (stream, early) = match stream {
                Ok(s) => s,
                Err(e) => {
                    reset(app);
                    let outcome = match e {
                        TunnelError::Denied => {
                            Outcome::Refused("denied by the destination's policy (401)".into())
                        }
                        other => Outcome::Unreachable(other.to_string()),
                    };
                    rec.finish(outcome);
                    return None;
                }
            };
            let _ = app.set_nodelay(true);
            if let Err(e) = discard(&mut app, early).await {
                // The peer has the bytes but the app's socket broke: nothing left to relay.
                reset(app);
                rec.finish(Outcome::Error {
                    sent: 0,
                    received: 0,
                    error: format!("taking the first bytes off the app's socket: {e}"),
                });
                return None;
            }
            rec.track(&mesh.metrics, &ends);
            let reg = mesh.conns.register(rec.live(None));
            reg.entry.stats.add_sent(early);
            let relay = stream.relay(app, reg.entry.stats.clone());
            return Some(Tunnelled { rec, reg, relay });
        }
    }
    None
}

/// At most this much of what the app sent before the stream opened rides with the CONNECT request:
/// a request or a TLS ClientHello fits, and it stays far below any peer's initial stream window.
const EARLY_DATA: usize = 16 * 1024;

/// What the app has sent so far (up to [`EARLY_DATA`]), left in its socket. Empty when it has sent
/// nothing yet (a server-first protocol) or the socket cannot be read.
fn peek_early(app: &TcpStream) -> Bytes {
    let queued = match crate::netns::unread_bytes(app) {
        Ok(n) if n > 0 => n,
        _ => return Bytes::new(),
    };
    // Sized by what is queued: a connection's task never holds a buffer of the full bound.
    let mut buf = vec![0u8; (queued as usize).min(EARLY_DATA)];
    // SAFETY: the buffer is valid for its length; MSG_PEEK leaves the bytes queued.
    let n = unsafe {
        libc::recv(
            app.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match usize::try_from(n) {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Bytes::from(buf)
        }
        _ => Bytes::new(),
    }
}

/// Takes the `n` bytes sent as early data off the app's socket, where [`peek_early`] left them.
async fn discard(app: &mut TcpStream, n: usize) -> std::io::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let mut scratch = vec![0u8; n];
    app.read_exact(&mut scratch).await.map(drop)
}
