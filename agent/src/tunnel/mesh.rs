//! Node-wide state the connection handlers share: who is where, certificates, the HBONE pool.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::pki_types::ServerName;

use super::{
    CONNECT_TIMEOUT, HboneClient, Pool, PoolConfig, PooledClient, ServerConfig, TunnelError,
    connect_in, conns::ConnTable, limits::HandshakeSlots,
};
use crate::{
    admin::{
        Metrics,
        metrics::{Decision as DecisionMetric, Direction as HandshakeDirection},
    },
    capture::Capture,
    config::{InboundMode, NodeConfig, OutboundUnknown, Ports, Protocol, Workload, WorkloadSet},
    identity::{CertStore, Identity, TrustDomain},
    netns::Netns,
    policy::{Decision, PolicySet, Reason, Request, WorkloadRef},
    tls,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pod of this node, as the connection handlers see it.
pub struct PodCtx {
    /// `namespace/name`.
    pub name: String,
    pub netns: Netns,
    pub ips: Vec<IpAddr>,
    /// Set when the node has a trust domain (mesh traffic); without it the agent only captures.
    pub identity: Option<Identity>,
    /// TLS for HBONE connections to this pod, presenting its certificate.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether the pod's netns is prepared for deliveries that keep the client's source address.
    pub transparent: bool,
}

impl PodCtx {
    /// The pod's address of the same family as `like`, for the `forwarded` header and deliveries.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }
}

/// Pooled HBONE connections are never shared between two pods, even of one service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_pod: String,
    pub dst_ip: IpAddr,
    pub identity: Identity,
}

/// Where a captured outbound connection goes.
pub enum Route<'a> {
    /// Outside the mesh (unknown IP or a TCP workload).
    External,
    /// A mesh pod of this node: delivered directly, no TLS hop.
    SameNode(Arc<PodCtx>),
    /// A mesh pod of another node: HBONE to it, which must present `identity`.
    Hbone {
        workload: &'a Workload,
        identity: Identity,
    },
}

pub struct Mesh {
    pub node: String,
    pub ports: Ports,
    pub inbound: InboundMode,
    probe_sources: Vec<ipnet::IpNet>,
    pub outbound_unknown: OutboundUnknown,
    pub capture: Arc<Capture>,
    pub trust_domain: Option<TrustDomain>,
    pub certs: Option<Arc<CertStore>>,
    pub pool: Pool<PoolKey>,
    pub conns: Arc<ConnTable>,
    pub metrics: Arc<Metrics>,
    /// Inbound HBONE: how long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Inbound HBONE: the bounds on unfinished TLS handshakes.
    pub handshake_slots: Arc<HandshakeSlots>,
    /// Inbound HBONE: HTTP/2 settings and time limits after the TLS handshake.
    pub hbone_server: ServerConfig,
    policies: RwLock<PolicySet>,
    workloads: RwLock<Arc<WorkloadSet>>,
    local: RwLock<HashMap<IpAddr, Arc<PodCtx>>>,
    /// Set once the agent stops taking new connections: inbound HBONE connections say GOAWAY, so
    /// peers put new streams on new connections (to a successor agent) while these streams finish.
    draining: tokio::sync::watch::Sender<bool>,
}

impl Mesh {
    pub fn new(
        cfg: &NodeConfig,
        capture: Arc<Capture>,
        certs: Option<Arc<CertStore>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node: cfg.node.clone(),
            ports: cfg.ports,
            inbound: cfg.inbound,
            probe_sources: cfg.probe_sources.clone(),
            outbound_unknown: cfg.outbound_unknown,
            capture,
            trust_domain: cfg.trust_domain.clone(),
            certs,
            pool: Pool::new(PoolConfig::default()),
            conns: Arc::new(ConnTable::default()),
            metrics,
            handshake_timeout: cfg.hbone.handshake_timeout,
            handshake_slots: HandshakeSlots::new(
                cfg.hbone.max_pending_handshakes,
                cfg.hbone.max_pending_handshakes_per_peer,
            ),
            hbone_server: ServerConfig::from_limits(&cfg.hbone),
            policies: RwLock::new(PolicySet::default()),
            workloads: RwLock::new(Arc::new(WorkloadSet::default())),
            local: RwLock::new(HashMap::new()),
            draining: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Tells every inbound HBONE connection to take no new streams.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves once the agent drains.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            // An error means the mesh is gone, and with it the agent.
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Whether plaintext from `ip` is a kubelet probe (delivered even in strict mode).
    pub fn is_probe_source(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.probe_sources.iter().any(|n| n.contains(&ip))
    }

    pub fn workloads(&self) -> Arc<WorkloadSet> {
        self.workloads.read().map(|w| w.clone()).unwrap_or_default()
    }

    pub fn set_workloads(&self, set: Arc<WorkloadSet>) {
        if let Ok(mut w) = self.workloads.write() {
            *w = set;
        }
    }

    pub fn add_local(&self, pod: Arc<PodCtx>) {
        if let Ok(mut m) = self.local.write() {
            for ip in &pod.ips {
                m.insert(*ip, pod.clone());
            }
        }
    }

    pub fn remove_local(&self, name: &str) {
        if let Ok(mut m) = self.local.write() {
            m.retain(|_, p| p.name != name);
        }
    }

    pub fn local_count(&self) -> usize {
        self.local
            .read()
            .map(|m| {
                let mut names: Vec<&str> = m.values().map(|p| p.name.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                names.len()
            })
            .unwrap_or(0)
    }

    pub fn is_local(&self, name: &str) -> bool {
        self.local
            .read()
            .map(|m| m.values().any(|p| p.name == name))
            .unwrap_or(false)
    }

    pub fn local_identity(&self, name: &str) -> Option<Identity> {
        self.local
            .read()
            .ok()?
            .values()
            .find(|p| p.name == name)
            .and_then(|p| p.identity.clone())
    }

    fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodCtx>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.local.read().ok()?.get(&ip).cloned()
    }

    pub fn policies(&self) -> PolicySet {
        self.policies.read().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn set_policies(&self, set: PolicySet) {
        if let Ok(mut p) = self.policies.write() {
            *p = set;
        }
    }

    /// Decides a connection to a pod of this node (the destination side, where policy is enforced),
    /// and counts the decision.
    pub fn authorize(
        &self,
        source: Option<&Identity>,
        source_ip: IpAddr,
        destination: &str,
        destination_addr: SocketAddr,
    ) -> Decision {
        let decision = self.decide(source, source_ip, destination, destination_addr);
        let (kind, policy) = match &decision.reason {
            Reason::AllowedBy { policy, .. } => (DecisionMetric::Allow, Some(policy.as_str())),
            Reason::NoAllowPolicy => (DecisionMetric::Allow, None),
            Reason::DeniedBy { policy, .. } => (DecisionMetric::Deny, Some(policy.as_str())),
            Reason::NoAllowMatch => (DecisionMetric::Deny, None),
        };
        self.metrics.policy_decision(kind, policy);
        for m in &decision.dry_run {
            let kind = if m.matched() == matches!(m.action, crate::policy::Action::Allow) {
                DecisionMetric::DryRunAllow
            } else {
                DecisionMetric::DryRunDeny
            };
            self.metrics.policy_decision(kind, Some(m.policy.as_str()));
        }
        for m in decision.audit.iter().filter(|m| m.matched()) {
            self.metrics
                .policy_decision(DecisionMetric::Audit, Some(m.policy.as_str()));
        }
        decision
    }

    /// The decision without counting it (for `ferry explain` and reload re-checks).
    pub fn decide(
        &self,
        source: Option<&Identity>,
        source_ip: IpAddr,
        destination: &str,
        destination_addr: SocketAddr,
    ) -> Decision {
        let set = self.workloads();
        let empty = std::collections::BTreeMap::new();
        let (namespace, name) = destination.split_once('/').unwrap_or(("", destination));
        let labels = set
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
            .map(|w| &w.labels)
            .unwrap_or(&empty);
        let request = Request {
            source,
            source_ip,
            destination: WorkloadRef {
                namespace,
                name,
                labels,
            },
            destination_ip: destination_addr.ip(),
            destination_port: destination_addr.port(),
        };
        self.policies().evaluate(&request)
    }

    /// The `namespace/name` of the workload at `ip`, if known.
    pub fn workload_at(&self, ip: IpAddr) -> Option<(String, String)> {
        self.workloads()
            .by_ip(ip)
            .map(|w| (w.namespace.clone(), w.name.clone()))
    }

    /// Decides where a connection to `dst` goes. `set` must outlive the route (it borrows from it).
    pub fn route<'a>(&self, set: &'a WorkloadSet, dst: SocketAddr) -> Route<'a> {
        let Some(td) = &self.trust_domain else {
            return Route::External;
        };
        match set.by_ip(dst.ip()) {
            Some(w) if w.protocol == Protocol::Hbone => {
                if w.node == self.node {
                    return match self.local_pod(dst.ip()) {
                        Some(pod) => Route::SameNode(pod),
                        // Known to be ours but not enrolled (yet): never leak it in plaintext.
                        None => Route::Hbone {
                            workload: w,
                            identity: match w.identity(td) {
                                Ok(id) => id,
                                Err(_) => return Route::External,
                            },
                        },
                    };
                }
                match w.identity(td) {
                    Ok(identity) => Route::Hbone {
                        workload: w,
                        identity,
                    },
                    Err(_) => Route::External,
                }
            }
            _ => Route::External,
        }
    }

    /// A stream slot on an HBONE connection from `src` to `dst_ip`, whose server must be `identity`;
    /// opens (TCP from the source pod's netns, then mutual TLS, then HTTP/2) when the pool has none.
    pub async fn hbone_client(
        &self,
        src: &PodCtx,
        dst_ip: IpAddr,
        identity: Identity,
    ) -> Result<PooledClient, TunnelError> {
        let (certs, src_id) = match (&self.certs, &src.identity) {
            (Some(c), Some(id)) => (c, id),
            _ => return Err(TunnelError::Closed),
        };
        let cert = certs.get(src_id).map_err(|e| {
            TunnelError::Io(std::io::Error::other(format!(
                "certificate of {src_id}: {e}"
            )))
        })?;
        let key = PoolKey {
            src_pod: src.name.clone(),
            dst_ip,
            identity: identity.clone(),
        };
        let hbone_port = self.ports.hbone;
        let netns = src.netns.clone();
        let metrics = self.metrics.clone();
        let generation = cert.generation();
        // The TLS config (trust anchors parsed, verifier built) only for a new connection: most
        // connections find a pooled one.
        let bundle = certs.bundle();
        self.pool
            .get_or_connect(key, generation, move || async move {
                let config = tls::client_config(bundle, cert.certified_key(), identity)
                    .map_err(|e| TunnelError::Io(std::io::Error::other(e.to_string())))?;
                let addr = SocketAddr::new(dst_ip, hbone_port);
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect_in(&netns, addr))
                    .await
                    .map_err(|_| {
                        TunnelError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {addr}"),
                        ))
                    })??;
                let _ = tcp.set_nodelay(true);
                let started = std::time::Instant::now();
                let tls = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    tokio_rustls::TlsConnector::from(config)
                        .connect(ServerName::IpAddress(dst_ip.into()), tcp),
                )
                .await
                .map_err(|_| TunnelError::HandshakeTimeout(HANDSHAKE_TIMEOUT))
                .and_then(|r| r.map_err(|e| TunnelError::Tls(tls::describe_handshake_error(&e))));
                metrics.tls_handshake(HandshakeDirection::Outbound, tls.is_ok(), started.elapsed());
                let tls = tls?;
                if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
                    return Err(TunnelError::Io(std::io::Error::other(
                        "peer did not negotiate ALPN h2",
                    )));
                }
                HboneClient::handshake(tls).await
            })
            .await
    }
}
