//! What the admin socket and the HTTP endpoints see of the running agent.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    admin::{
        AdminState,
        api::{CertRow, ConnRow, PolicyRow, ReloadStatus, Request, Status, WorkloadRow},
        socket::AdminApi,
    },
    capture::Capture,
    config::{NodeConfig, Protocol},
    identity::Identity,
    tunnel::Mesh,
};

pub struct AgentView {
    pub cfg: Arc<NodeConfig>,
    pub mesh: Arc<Mesh>,
    pub capture: Arc<Capture>,
    pub started: Instant,
    pub ready: AtomicBool,
    pub generation: AtomicU64,
    pub last_reload: Mutex<Option<ReloadStatus>>,
    /// The Kubernetes source's state, when the workloads come from the API.
    pub kube: Option<Arc<super::source::KubeState>>,
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentView {
    pub fn record_reload(&self, config: &str, result: Result<(), String>) {
        if result.is_ok() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        let status = ReloadStatus {
            config: config.into(),
            ok: result.is_ok(),
            error: result.err(),
            at: unix(SystemTime::now()),
        };
        if let Ok(mut l) = self.last_reload.lock() {
            *l = Some(status);
        }
    }

    fn status(&self) -> Status {
        let soonest = self
            .mesh
            .certs
            .as_ref()
            .and_then(|c| c.soonest_expiry())
            .map(unix);
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            node: self.cfg.node.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            ready: self.ready.load(Ordering::Relaxed),
            programs: self.attached(),
            enrolled_pods: self.mesh.local_count(),
            live_connections: self.mesh.conns.len(),
            soonest_cert_expiry: soonest,
            config_generation: self.generation.load(Ordering::Relaxed),
            last_reload: self.last_reload.lock().ok().and_then(|l| l.clone()),
            capture_counters: self
                .capture
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            kubernetes: self.kube.as_ref().map(|k| k.status()),
        }
    }

    /// The programs whose links are pinned (so attached): the cgroup programs once, `sk_lookup` with
    /// the number of pod netns it is attached to; and the fast path's verdict, attached by this agent,
    /// or why it is off.
    fn attached(&self) -> Vec<String> {
        let links = self.cfg.bpffs_root.join("links");
        let mut names: Vec<String> = std::fs::read_dir(&links)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let netns = names.iter().filter(|n| n.starts_with("sk_lookup-")).count();
        names.retain(|n| !n.starts_with("sk_lookup-"));
        names.sort();
        if netns > 0 {
            names.push(format!("{} (x{netns})", ferry_common::programs::SK_LOOKUP));
        }
        let verdict = ferry_common::programs::SPLICE_VERDICT;
        match &self.mesh.capture.splice_off {
            None => names.push(verdict.to_owned()),
            Some(why) => names.push(format!("{verdict} (off: {why})")),
        }
        names
    }

    fn workloads(&self) -> Vec<WorkloadRow> {
        let set = self.mesh.workloads();
        set.iter()
            .map(|w| WorkloadRow {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                node: w.node.clone(),
                ips: w.ips.iter().map(ToString::to_string).collect(),
                identity: self
                    .cfg
                    .trust_domain
                    .as_ref()
                    .and_then(|td| w.identity(td).ok())
                    .map(|i| i.to_string()),
                protocol: match w.protocol {
                    Protocol::Hbone => "HBONE".into(),
                    Protocol::Tcp => "TCP".into(),
                },
                enrolled: self.mesh.is_local(&w.key()),
            })
            .collect()
    }

    fn conns(&self) -> Vec<ConnRow> {
        use crate::tunnel::conn::Direction;
        self.mesh
            .conns
            .snapshot()
            .into_iter()
            .map(|c| {
                let src_workload = self
                    .mesh
                    .workload_at(c.src.ip())
                    .map(|(ns, n)| format!("{ns}/{n}"));
                let dst_workload = self
                    .mesh
                    .workload_at(c.dst.ip())
                    .map(|(ns, n)| format!("{ns}/{n}"));
                let own = self.mesh.local_identity(&c.pod).map(|i| i.to_string());
                let (src_identity, dst_identity) = match c.direction {
                    Direction::Outbound => (own, c.peer.clone()),
                    Direction::Inbound => (c.peer.clone(), own),
                };
                ConnRow {
                    id: c.id,
                    direction: c.direction.as_str().into(),
                    pod: c.pod.clone(),
                    src: c.src.to_string(),
                    dst: c.dst.to_string(),
                    src_workload,
                    dst_workload,
                    route: c.route.into(),
                    src_identity,
                    dst_identity,
                    bytes_sent: c.stats.sent(),
                    bytes_received: c.stats.received(),
                    age_secs: c.started.elapsed().as_secs_f64(),
                }
            })
            .collect()
    }

    fn certs(&self) -> Vec<CertRow> {
        let Some(certs) = &self.mesh.certs else {
            return Vec::new();
        };
        certs
            .list()
            .into_iter()
            .map(|c| CertRow {
                identity: c.identity().to_string(),
                generation: c.generation(),
                not_before: unix(c.not_before()),
                not_after: unix(c.not_after()),
                renew_at: unix(c.renew_at()),
            })
            .collect()
    }

    fn policies(&self) -> Vec<PolicyRow> {
        self.mesh
            .policies()
            .iter()
            .map(|p| PolicyRow {
                id: p.id().to_string(),
                action: format!("{:?}", p.action()).to_uppercase(),
                dry_run: p.dry_run(),
                scope: p.scope().to_string(),
                rules: p.rule_count(),
                location: p.location().to_string(),
                warnings: p.warnings().to_vec(),
            })
            .collect()
    }

    /// `from`: a SPIFFE id or `namespace/pod`; `to`: `namespace/pod:port`.
    fn explain(&self, from: &str, to: &str) -> Result<serde_json::Value, String> {
        let set = self.mesh.workloads();
        let td = self.cfg.trust_domain.clone();
        let (to_workload, port) = to
            .rsplit_once(':')
            .and_then(|(w, p)| p.parse::<u16>().ok().map(|p| (w, p)))
            .ok_or_else(|| format!("--to {to:?}: expected namespace/pod:port"))?;
        let dst = set
            .iter()
            .find(|w| w.key() == to_workload)
            .ok_or_else(|| format!("--to: no workload {to_workload} is known to this agent"))?;
        if dst.node != self.cfg.node {
            return Err(format!(
                "{to_workload} runs on node {}: policy is enforced there, ask that node's agent",
                dst.node
            ));
        }
        let dst_ip = dst
            .ips
            .first()
            .copied()
            .ok_or_else(|| format!("{to_workload} has no IP"))?;
        let (source, source_ip) = if from.starts_with("spiffe://") {
            let id: Identity = from.parse().map_err(|e| format!("--from: {e}"))?;
            let ip = set
                .iter()
                .find(|w| td.as_ref().and_then(|td| w.identity(td).ok()).as_ref() == Some(&id))
                .and_then(|w| w.ips.first().copied())
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            (Some(id), ip)
        } else {
            let w = set.iter().find(|w| w.key() == from).ok_or_else(|| {
                format!("--from: no workload {from} is known (give a SPIFFE id instead)")
            })?;
            let id = td.as_ref().and_then(|td| w.identity(td).ok());
            let ip = w
                .ips
                .first()
                .copied()
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            (id, ip)
        };
        let d = self.mesh.decide(
            source.as_ref(),
            source_ip,
            to_workload,
            std::net::SocketAddr::new(dst_ip, port),
        );
        let (policy, rule) = match &d.reason {
            crate::policy::Reason::AllowedBy { policy, rule }
            | crate::policy::Reason::DeniedBy { policy, rule } => {
                (Some(policy.to_string()), Some(*rule))
            }
            _ => (None, None),
        };
        let matches = |list: &[crate::policy::Match]| -> Vec<serde_json::Value> {
            list.iter()
                .map(|m| serde_json::json!({"policy": m.policy.to_string(), "action": format!("{:?}", m.action).to_uppercase(), "rule": m.rule, "matched": m.matched()}))
                .collect()
        };
        Ok(serde_json::json!({
            "from": from,
            "source_identity": source.map(|s| s.to_string()),
            "to": to,
            "allowed": d.allowed(),
            "decision": d.to_string(),
            "policy": policy,
            "rule": rule,
            "dry_run": matches(&d.dry_run),
            "audit": matches(&d.audit),
        }))
    }

    /// Refreshes the gauges that are read rather than counted.
    pub fn refresh_gauges(&self) {
        let m = &self.mesh.metrics;
        let stats = self.mesh.pool.stats();
        m.set_pool(stats.connections as u64, stats.streams as u64);
        for c in self.certs() {
            m.set_certificate_expiry(&c.identity, c.not_after as i64);
        }
    }
}

fn json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

impl AdminApi for AgentView {
    fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
        match request {
            Request::Status => json(self.status()),
            Request::Workloads => json(self.workloads()),
            Request::Conns => json(self.conns()),
            Request::Certs => json(self.certs()),
            Request::ConfigDump => json(&*self.cfg),
            Request::Policies => json(self.policies()),
            Request::Explain { from, to } => self.explain(&from, &to),
        }
    }
}

impl AdminState for AgentView {
    fn metrics(&self) -> String {
        self.refresh_gauges();
        self.mesh.metrics.encode()
    }

    fn ready(&self) -> Result<(), String> {
        // Until the first list of pods and namespaces, this agent has enrolled nothing: in a rolling
        // update the previous agent must keep serving until then.
        match &self.kube {
            Some(k) if !k.status().synced => Err(
                "waiting for the first list of pods and namespaces from the Kubernetes API".into(),
            ),
            _ if !self.ready.load(Ordering::Relaxed) => {
                Err("capture, certificates or configuration not ready yet".into())
            }
            _ => Ok(()),
        }
    }
}
