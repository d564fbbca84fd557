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
        api::{CertRow, ConnRow, ReloadStatus, Request, Status, WorkloadRow},
        socket::AdminApi,
    },
    capture::Capture,
    config::{NodeConfig, Protocol},
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
            programs: crate::capture::PROGRAMS
                .iter()
                .map(|p| p.to_string())
                .collect(),
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
        }
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
            Request::Policies => Err("no policy engine in this agent yet".into()),
            Request::Explain { .. } => Err("no policy engine in this agent yet".into()),
        }
    }
}

impl AdminState for AgentView {
    fn metrics(&self) -> String {
        self.refresh_gauges();
        self.mesh.metrics.encode()
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("capture, certificates or configuration not ready yet".into())
        }
    }
}
