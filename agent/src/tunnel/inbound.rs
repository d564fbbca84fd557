//! Inbound: connections steered by `sk_lookup` to the agent's sockets in the destination pod's netns —
//! plaintext from outside the mesh, or HBONE (mutual TLS) from other agents. Their local address is
//! the one the client dialled.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    ConnectRequest, HboneServer, Reject, TunnelError, Upstream,
    conn::{ConnRecord, Direction, Ends, Outcome},
    conns::PolicyInput,
    deliver,
    kill::Killable,
    mesh::{Mesh, PodCtx},
    reset,
    splice::splice,
};
use crate::{
    admin::metrics::{Direction as HandshakeDirection, RefusedReason},
    config::InboundMode,
    tls,
};

pub async fn handle_plaintext(mesh: &Mesh, pod: &PodCtx, client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(pod = %pod.name, error = %e, "inbound connection without a local address");
            return;
        }
    };
    let mut rec = ConnRecord::new(Direction::Inbound, pod.name.clone(), peer, dst);
    rec.route = "plaintext";
    match mesh.inbound {
        // The kubelet's probes come in plaintext from the node's address; they reach the app without
        // policy, as Istio exempts them, and nothing else plaintext does.
        InboundMode::Strict if mesh.is_probe_source(peer.ip()) => {
            rec.route = "probe";
            permissive(mesh, pod, client, peer, dst, rec).await
        }
        InboundMode::Strict => {
            mesh.metrics.inbound_plaintext_refused();
            reset(client);
            rec.finish(Outcome::Refused("plaintext inbound in strict mode".into()));
        }
        InboundMode::Permissive => {
            let decision = mesh.authorize(None, peer.ip(), &pod.name, dst);
            rec.decision = Some(decision.to_string());
            if !decision.allowed() {
                reset(client);
                return rec.finish(Outcome::Refused(decision.to_string()));
            }
            permissive(mesh, pod, client, peer, dst, rec).await
        }
    }
}

/// Permissive mode: plaintext from outside the mesh, authorized, delivered as it came.
async fn permissive(
    mesh: &Mesh,
    pod: &PodCtx,
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    mut rec: ConnRecord,
) {
    match deliver(&mesh.capture, pod, Some(peer.ip()), dst).await {
        Ok(app) => {
            let policy = PolicyInput {
                source: None,
                source_ip: peer.ip(),
                destination: pod.name.clone(),
                destination_addr: dst,
            };
            let ends = Ends {
                src: mesh.workload_at(peer.ip()),
                dst: Ends::workload(&pod.name),
                dst_principal: pod.identity.as_ref().map(|i| i.principal()),
                ..Ends::default()
            };
            rec.track(&mesh.metrics, &ends);
            let reg = mesh.conns.register(rec.live(Some(policy)));
            rec.finish(splice(client, app, &reg.entry.stats, &reg.entry.kill, None).await)
        }
        Err(e) => {
            reset(client);
            rec.finish(Outcome::Unreachable(e.to_string()));
        }
    }
}

/// One HBONE connection from another agent (or any HBONE peer of the trust domain): mutual TLS, then
/// one CONNECT stream per proxied connection.
pub async fn handle_hbone(mesh: Arc<Mesh>, pod: Arc<PodCtx>, tcp: TcpStream, peer: SocketAddr) {
    let fail = |reason: String| {
        tracing::warn!(target: "ferry::hbone", pod = %pod.name, %peer, %reason, "HBONE connection refused");
    };
    let Some(server_tls) = pod.server_tls.clone() else {
        reset(tcp);
        return fail("this node has no trust domain configured".into());
    };
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let metrics = &mesh.metrics;
    // Taken before reading a byte: an anonymous peer holds a slot only while its handshake may run.
    let slot = match mesh.handshake_slots.try_acquire(peer.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            metrics.hbone_refused(RefusedReason::Overloaded);
            reset(tcp);
            return fail(e.to_string());
        }
    };
    metrics.set_pending_handshakes(mesh.handshake_slots.pending());
    let _ = tcp.set_nodelay(true);
    let accept = tokio_rustls::TlsAcceptor::from(server_tls).accept(tcp);
    let started = std::time::Instant::now();
    let handshake = tokio::time::timeout(mesh.handshake_timeout, accept).await;
    drop(slot);
    metrics.set_pending_handshakes(mesh.handshake_slots.pending());
    metrics.tls_handshake(
        HandshakeDirection::Inbound,
        matches!(handshake, Ok(Ok(_))),
        started.elapsed(),
    );
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.hbone_refused(RefusedReason::Tls);
            return fail(tls::describe_handshake_error(&e));
        }
        Err(_) => {
            metrics.hbone_refused(RefusedReason::Timeout);
            return fail("TLS handshake timed out".into());
        }
    };
    let conn = tls.get_ref().1;
    if conn.alpn_protocol() != Some(tls::ALPN_H2) {
        metrics.hbone_refused(RefusedReason::Alpn);
        return fail("peer did not negotiate ALPN h2".into());
    }
    let peer_id = match tls::peer_identity(conn.peer_certificates().unwrap_or_default()) {
        Ok(id) => id,
        Err(e) => {
            metrics.hbone_refused(RefusedReason::Identity);
            return fail(format!("peer identity: {e}"));
        }
    };
    let handler_pod = pod.clone();
    let handler_mesh = mesh.clone();
    let handler = Arc::new(move |req: ConnectRequest| {
        let (pod, mesh, peer_id) = (handler_pod.clone(), handler_mesh.clone(), peer_id.clone());
        async move {
            let src = req
                .forwarded_for
                .filter(|f| f.ip() == peer.ip())
                .unwrap_or(peer);
            let mut rec = ConnRecord::new(Direction::Inbound, pod.name.clone(), src, req.target);
            rec.route = "hbone";
            rec.peer = Some(peer_id.to_string());
            let own = [mesh.ports.outbound, mesh.ports.inbound, mesh.ports.hbone];
            if own.contains(&req.target.port()) {
                rec.finish(Outcome::Unreachable("targets the agent's own port".into()));
                return Err(Reject::Unreachable);
            }
            let decision = mesh.authorize(Some(&peer_id), src.ip(), &pod.name, req.target);
            rec.decision = Some(decision.to_string());
            if !decision.allowed() {
                rec.finish(Outcome::Refused(decision.to_string()));
                return Err(Reject::Denied);
            }
            match deliver(&mesh.capture, &pod, Some(peer.ip()), req.target).await {
                Ok(app) => {
                    let _ = app.set_nodelay(true);
                    let policy = PolicyInput {
                        source: Some(peer_id),
                        source_ip: src.ip(),
                        destination: pod.name.clone(),
                        destination_addr: req.target,
                    };
                    let ends = Ends {
                        src: mesh.workload_at(src.ip()),
                        src_principal: policy.source.as_ref().map(|i| i.principal()),
                        dst: Ends::workload(&pod.name),
                        dst_principal: pod.identity.as_ref().map(|i| i.principal()),
                        mutual_tls: true,
                    };
                    rec.track(&mesh.metrics, &ends);
                    let reg = mesh.conns.register(rec.live(Some(policy)));
                    let stats = reg.entry.stats.clone();
                    Ok(Upstream::new(Killable::new(app, reg.entry.kill.clone()))
                        .with_stats(stats)
                        .on_complete(move |r| {
                            drop(reg);
                            rec.finish(match r {
                                Ok(o) => Outcome::Closed {
                                    sent: o.received,
                                    received: o.sent,
                                },
                                Err(e) => Outcome::Error {
                                    sent: 0,
                                    received: 0,
                                    error: e.to_string(),
                                },
                            })
                        }))
                }
                Err(e) => {
                    rec.finish(Outcome::Unreachable(e.to_string()));
                    Err(Reject::Unreachable)
                }
            }
        }
    });
    match HboneServer::new(handler, mesh.hbone_server.clone())
        .serve_connection_until(tls, Some(local.ip()), mesh.drained())
        .await
    {
        Ok(()) => {}
        Err(e @ TunnelError::RequestTimeout(_)) => {
            metrics.hbone_refused(RefusedReason::RequestTimeout);
            fail(e.to_string());
        }
        Err(e @ TunnelError::HandshakeTimeout(_)) => {
            metrics.hbone_refused(RefusedReason::Timeout);
            fail(e.to_string());
        }
        Err(e) => {
            tracing::debug!(target: "ferry::hbone", pod = %pod.name, %peer, error = %e, "HBONE connection ended");
        }
    }
}
