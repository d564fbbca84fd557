//! The admin socket's protocol: one JSON request line, one JSON response line. These types are the
//! stable schema of `ferry … -o json`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Workloads,
    Policies,
    Conns,
    Certs,
    /// Why a connection from `from` (a SPIFFE id or `ns/pod`) to `to` (`ns/pod:port`) is allowed or not.
    Explain {
        from: String,
        to: String,
    },
    ConfigDump,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// `workloads` or `policies`.
    pub config: String,
    pub ok: bool,
    pub error: Option<String>,
    /// Unix seconds.
    pub at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub node: String,
    pub uptime_secs: u64,
    pub ready: bool,
    pub programs: Vec<String>,
    pub enrolled_pods: usize,
    pub live_connections: usize,
    /// Unix seconds of the soonest workload certificate expiry.
    pub soonest_cert_expiry: Option<u64>,
    /// Bumped on every successful reload of workloads or policies.
    pub config_generation: u64,
    pub last_reload: Option<ReloadStatus>,
    pub capture_counters: BTreeMap<String, u64>,
    /// Present when the workloads come from the Kubernetes API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeStatus>,
}

/// The Kubernetes workload source: API connection and what the agent knows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KubeStatus {
    /// Both watches (pods, namespaces) connected; while not, the last known state is served.
    pub connected: bool,
    /// Unix seconds of the last change of `connected`.
    pub since: u64,
    pub last_error: Option<String>,
    pub disconnects: u64,
    /// The first complete list of pods and namespaces has arrived (nothing is enrolled before).
    pub synced: bool,
    pub pods: usize,
    pub namespaces: usize,
    /// Meshed pods of this node whose netns is not known yet (no CNI ADD, no process).
    pub waiting_for_netns: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadRow {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<String>,
    pub identity: Option<String>,
    pub protocol: String,
    /// On this node and enrolled in capture.
    pub enrolled: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnRow {
    pub id: u64,
    pub direction: String,
    /// `namespace/name` of the pod of this node.
    pub pod: String,
    pub src: String,
    pub dst: String,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub route: String,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_secs: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertRow {
    pub identity: String,
    pub generation: u64,
    pub not_before: u64,
    pub not_after: u64,
    pub renew_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRow {
    /// `namespace/name`.
    pub id: String,
    pub action: String,
    pub dry_run: bool,
    pub scope: String,
    pub rules: usize,
    /// File and line.
    pub location: String,
    pub warnings: Vec<String>,
}
