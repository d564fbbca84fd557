//! What the agent knows of the cluster: pods and namespaces from the API, the pods the CNI plugin
//! announced, and from that the workload set (the cluster-wide IP → identity table, with this
//! node's meshed pods carrying their cgroup and netns).
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::cgroup::{self, QosClass};
use crate::config::{KubernetesConfig, LocalPod, Protocol, Workload, WorkloadSet};

/// The label that meshes a namespace or a pod (`enabled`), or opts a pod out (`disabled`).
pub const MESH_LABEL: &str = "ferry.io/mesh";

/// The parts of a Pod object the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub service_account: String,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub qos: Option<QosClass>,
    /// Succeeded or Failed: its containers are gone and its IPs may be reused.
    pub terminated: bool,
}

impl PodInfo {
    /// `None` for an object without a name or namespace (never sent by a real API server).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        }
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            labels: meta.labels.clone().unwrap_or_default(),
            ips,
            qos: status
                .and_then(|s| s.qos_class.as_deref())
                .and_then(QosClass::parse),
            terminated: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
        })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub fn namespace_labels(ns: &Namespace) -> Option<(String, BTreeMap<String, String>)> {
    Some((
        ns.metadata.name.clone()?,
        ns.metadata.labels.clone().unwrap_or_default(),
    ))
}

/// A pod is meshed when it or its namespace says `ferry.io/mesh: enabled`, unless the pod says
/// `disabled`; pods on the host's network never are (their traffic is the node's).
pub fn is_meshed(pod: &PodInfo, namespace: Option<&BTreeMap<String, String>>) -> bool {
    if pod.host_network {
        return false;
    }
    match pod.labels.get(MESH_LABEL).map(String::as_str) {
        Some("enabled") => true,
        Some("disabled") => false,
        _ => namespace
            .and_then(|l| l.get(MESH_LABEL))
            .is_some_and(|v| v == "enabled"),
    }
}

/// What the CNI plugin told the agent about a pod of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniPod {
    pub uid: Option<String>,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Default)]
pub struct Cluster {
    pub pods: HashMap<String, PodInfo>,
    pub namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Both watches have delivered their first complete list: before that, an empty table would
    /// un-enroll every pod, so nothing is reconciled.
    pub pods_synced: bool,
    pub namespaces_synced: bool,
    /// Sandboxes the CNI plugin added, by `namespace/name`.
    pub cni: HashMap<String, CniPod>,
    /// Sandboxes the CNI plugin deleted (by `namespace/name`, with the pod's uid when known): not
    /// enrolled again until a new ADD, even while the API still lists the pod.
    pub deleted: HashMap<String, Option<String>>,
    /// Netns found from a pod's processes, by uid, so a pod keeps the path it was enrolled with.
    pub found_netns: HashMap<String, PathBuf>,
}

/// The workload set built from the cluster, and whether a meshed pod of this node still waits for
/// its netns (no CNI announcement and no process yet).
pub struct Built {
    pub set: WorkloadSet,
    pub pending: usize,
    /// Addresses claimed by two pods (only the first is kept).
    pub conflicts: Vec<String>,
}

impl Cluster {
    pub fn synced(&self) -> bool {
        self.pods_synced && self.namespaces_synced
    }

    pub fn meshed(&self, key: &str) -> Option<bool> {
        let pod = self.pods.get(key)?;
        Some(is_meshed(pod, self.namespaces.get(&pod.namespace)))
    }

    pub fn build(&mut self, node: &str, k: &KubernetesConfig) -> Built {
        let mut pods: Vec<&PodInfo> = self
            .pods
            .values()
            .filter(|p| !p.host_network && !p.terminated)
            .collect();
        // Deterministic order, so an address conflict is always resolved the same way.
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut workloads = Vec::new();
        let mut pending = 0;
        let mut found = Vec::new();
        for p in pods {
            let key = p.key();
            let meshed = is_meshed(p, self.namespaces.get(&p.namespace));
            let cni = self
                .cni
                .get(&key)
                .filter(|c| c.uid.is_none() || c.uid.as_deref() == Some(p.uid.as_str()));
            let mut ips = p.ips.clone();
            if ips.is_empty()
                && let Some(c) = cni
            {
                ips = c.ips.clone();
            }
            let deleted = self
                .deleted
                .get(&key)
                .is_some_and(|uid| uid.is_none() || uid.as_deref() == Some(p.uid.as_str()));
            let local = if meshed && p.node == node && !deleted && !ips.is_empty() {
                let cgroup = cgroup::find_pod_cgroup(k, &p.uid, p.qos);
                let netns = cni
                    .map(|c| c.netns.clone())
                    .or_else(|| self.found_netns.get(&p.uid).cloned())
                    .or_else(|| {
                        let n = cgroup::netns_from_cgroup(&cgroup)?;
                        found.push((p.uid.clone(), n.clone()));
                        Some(n)
                    });
                match netns {
                    Some(netns) => Some(LocalPod { netns, cgroup }),
                    None => {
                        pending += 1;
                        None
                    }
                }
            } else {
                None
            };
            if ips.is_empty() {
                continue;
            }
            workloads.push(Workload {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                node: p.node.clone(),
                ips,
                labels: p.labels.clone(),
                protocol: if meshed {
                    Protocol::Hbone
                } else {
                    Protocol::Tcp
                },
                local,
            });
        }
        self.found_netns.extend(found);
        let (set, conflicts) = WorkloadSet::from_workloads(workloads);
        Built {
            set,
            pending,
            conflicts,
        }
    }

    /// Forgets per-pod records of pods the API no longer lists.
    pub fn forget_gone(&mut self) {
        let uids: std::collections::HashSet<&str> =
            self.pods.values().map(|p| p.uid.as_str()).collect();
        self.found_netns
            .retain(|uid, _| uids.contains(uid.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodInfo {
        let p: Pod = serde_json::from_value(json).unwrap();
        PodInfo::from_pod(&p).unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sample(pod_labels: serde_json::Value, host_network: bool) -> PodInfo {
        pod(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1", "labels": pod_labels},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "qosClass": "Burstable",
                       "podIP": "198.18.1.10", "podIPs": [{"ip": "198.18.1.10"}, {"ip": "2001:db8:1::10"}]}
        }))
    }

    #[test]
    fn pod_fields_come_from_the_kubernetes_object() {
        let p = sample(serde_json::json!({"app": "web"}), false);
        assert_eq!(p.key(), "shop/web-0");
        assert_eq!(p.service_account, "web");
        assert_eq!(p.node, "n1");
        assert_eq!(p.qos, Some(QosClass::Burstable));
        assert_eq!(p.ips.len(), 2);
        assert!(!p.terminated);
    }

    #[test]
    fn meshed_by_namespace_or_pod_label_and_never_on_the_host_network() {
        let on = labels(&[(MESH_LABEL, "enabled")]);
        let plain = sample(serde_json::json!({}), false);
        assert!(!is_meshed(&plain, None));
        assert!(!is_meshed(
            &plain,
            Some(&labels(&[(MESH_LABEL, "disabled")]))
        ));
        assert!(is_meshed(&plain, Some(&on)));
        let opted_in = sample(serde_json::json!({MESH_LABEL: "enabled"}), false);
        assert!(is_meshed(&opted_in, None));
        let opted_out = sample(serde_json::json!({MESH_LABEL: "disabled"}), false);
        assert!(!is_meshed(&opted_out, Some(&on)));
        let host = sample(serde_json::json!({MESH_LABEL: "enabled"}), true);
        assert!(!is_meshed(&host, Some(&on)));
    }

    #[test]
    fn remote_and_unmeshed_pods_are_in_the_ip_table_without_local_parts() {
        let k = KubernetesConfig {
            kubeconfig: None,
            cgroup_driver: crate::config::CgroupDriver::Cgroupfs,
            kubepods_cgroup: PathBuf::from("/nonexistent/kubepods"),
            cni_socket: PathBuf::from("/run/ferry/cni.sock"),
        };
        let mut c = Cluster::default();
        let p = sample(serde_json::json!({MESH_LABEL: "enabled"}), false);
        c.pods.insert(p.key(), p);
        let mut q = sample(serde_json::json!({}), false);
        q.name = "db-0".into();
        q.ips = vec!["198.18.1.11".parse().unwrap()];
        c.pods.insert(q.key(), q);
        let mut h = sample(serde_json::json!({}), true);
        h.name = "node-exporter".into();
        c.pods.insert(h.key(), h);
        // On another node: both in the table, neither local.
        let b = c.build("n2", &k);
        assert_eq!(b.set.len(), 2);
        assert_eq!(b.pending, 0);
        let web = b.set.by_ip("2001:db8:1::10".parse().unwrap()).unwrap();
        assert_eq!((web.protocol, web.local.is_none()), (Protocol::Hbone, true));
        let db = b.set.by_ip("198.18.1.11".parse().unwrap()).unwrap();
        assert_eq!(db.protocol, Protocol::Tcp);
        // On its node, with no process and no CNI announcement: waiting for its netns.
        let b = c.build("n1", &k);
        assert_eq!(b.pending, 1);
        // The CNI plugin announced it: local, with the kubelet's cgroup for its class.
        c.cni.insert(
            "shop/web-0".into(),
            CniPod {
                uid: Some("u-1".into()),
                netns: PathBuf::from("/var/run/netns/cni-1"),
                ips: vec![],
            },
        );
        let b = c.build("n1", &k);
        let local = b.set.local().next().map(|(_, l)| l.clone()).unwrap();
        assert_eq!(local.netns, PathBuf::from("/var/run/netns/cni-1"));
        assert_eq!(
            local.cgroup,
            PathBuf::from("/nonexistent/kubepods/burstable/podu-1")
        );
        // Deleted by the CNI plugin: no longer local though the API still lists it.
        c.deleted.insert("shop/web-0".into(), Some("u-1".into()));
        assert_eq!(c.build("n1", &k).set.local().count(), 0);
    }
}
