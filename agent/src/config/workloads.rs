use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{ConfigError, node::is_dns_label, parse_yaml, read_file};
use crate::identity::{Identity, SpiffeIdError, TrustDomain};

/// How traffic to a workload is carried.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Mesh workload: reached over mutual TLS on its node's agent (HBONE).
    #[default]
    Hbone,
    /// Outside the mesh: plain TCP.
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    workloads: Vec<RawWorkload>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    namespace: String,
    #[serde(default = "default_sa")]
    service_account: String,
    node: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    protocol: Protocol,
    netns: Option<PathBuf>,
    cgroup: Option<PathBuf>,
}

fn default_sa() -> String {
    "default".into()
}

/// Where a pod of this node lives: what the capture layer needs to enroll it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct LocalPod {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub protocol: Protocol,
    /// Set exactly for the workloads of the node that loaded the file.
    pub local: Option<LocalPod>,
}

impl Workload {
    /// The workload's SPIFFE identity in `td`.
    pub fn identity(&self, td: &TrustDomain) -> Result<Identity, SpiffeIdError> {
        Identity::new(td.clone(), &self.namespace, &self.service_account)
    }

    /// `namespace/name`, unique within a workload set.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// All workloads the node knows, indexed by IP for routing and identity checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadSet {
    workloads: Vec<Workload>,
    by_ip: HashMap<IpAddr, usize>,
}

impl WorkloadSet {
    pub fn load(path: &Path, this_node: &str) -> Result<Self, ConfigError> {
        Self::parse(path, &read_file(path)?, this_node)
    }

    pub fn parse(path: &Path, text: &str, this_node: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = parse_yaml(path, text)?;
        let mut set = WorkloadSet::default();
        let mut keys = HashMap::new();
        for (i, w) in raw.workloads.into_iter().enumerate() {
            let invalid = |field: &str, message: String| ConfigError::Invalid {
                path: path.to_owned(),
                field: format!("workloads[{i}].{field}"),
                message,
            };
            for (field, value) in [
                ("name", &w.name),
                ("namespace", &w.namespace),
                ("service_account", &w.service_account),
                ("node", &w.node),
            ] {
                if !is_dns_label(value) {
                    return Err(invalid(field, format!("{value:?} is not a valid DNS name")));
                }
            }
            let local = if w.node == this_node {
                let netns = w.netns.ok_or_else(|| {
                    invalid("netns", "required for a workload on this node".into())
                })?;
                let cgroup = w.cgroup.ok_or_else(|| {
                    invalid("cgroup", "required for a workload on this node".into())
                })?;
                Some(LocalPod { netns, cgroup })
            } else {
                None
            };
            let workload = Workload {
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                node: w.node,
                ips: w.ips,
                labels: w.labels,
                protocol: w.protocol,
                local,
            };
            if let Some(prev) = keys.insert(workload.key(), i) {
                return Err(invalid(
                    "name",
                    format!("{} is also workloads[{prev}]", workload.key()),
                ));
            }
            for ip in &workload.ips {
                if let Some(prev) = set.by_ip.insert(*ip, i) {
                    return Err(invalid(
                        "ips",
                        format!("{ip} is also used by workloads[{prev}]"),
                    ));
                }
            }
            set.workloads.push(workload);
        }
        Ok(set)
    }

    /// A set from workloads another source already validated (the Kubernetes API): a workload whose
    /// name or an address is already taken is left out, and named in the returned list.
    pub fn from_workloads(workloads: Vec<Workload>) -> (Self, Vec<String>) {
        let mut set = WorkloadSet::default();
        let mut keys = std::collections::HashSet::new();
        let mut skipped = Vec::new();
        for w in workloads {
            let i = set.workloads.len();
            let taken = w.ips.iter().find(|ip| set.by_ip.contains_key(ip));
            if let Some(ip) = taken {
                skipped.push(format!("{}: {ip} is also another workload's", w.key()));
                continue;
            }
            if !keys.insert(w.key()) {
                skipped.push(format!("{}: listed twice", w.key()));
                continue;
            }
            for ip in &w.ips {
                set.by_ip.insert(*ip, i);
            }
            set.workloads.push(w);
        }
        (set, skipped)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.iter()
    }

    pub fn local(&self) -> impl Iterator<Item = (&Workload, &LocalPod)> {
        self.workloads
            .iter()
            .filter_map(|w| w.local.as_ref().map(|l| (w, l)))
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    pub fn len(&self) -> usize {
        self.workloads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
workloads:
  - name: a
    namespace: default
    node: n1
    ips: [198.18.1.10, 2001:db8:1::10]
    netns: /var/run/netns/a
    cgroup: /sys/fs/cgroup/unified/ferry/a
  - name: b
    namespace: shop
    service_account: cart
    node: n2
    ips: [198.18.2.10]
    labels: {app: cart}
";

    #[test]
    fn local_workloads_carry_netns_and_cgroup() {
        let set = WorkloadSet::parse(Path::new("w.yaml"), FILE, "n1").unwrap();
        let local: Vec<_> = set.local().map(|(w, _)| w.key()).collect();
        assert_eq!(local, ["default/a"]);
        let b = set.by_ip("198.18.2.10".parse().unwrap()).unwrap();
        assert_eq!(
            (b.service_account.as_str(), b.local.is_none()),
            ("cart", true)
        );
        let mapped: IpAddr = "::ffff:198.18.2.10".parse().unwrap();
        assert_eq!(set.by_ip(mapped).map(|w| w.name.as_str()), Some("b"));
    }

    #[test]
    fn local_workload_without_netns_is_an_error_naming_the_field() {
        // On n2, b is local and lacks its netns; a (on n1) needs none there.
        let err = WorkloadSet::parse(Path::new("w.yaml"), FILE, "n2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workloads[1].netns"), "{err}");
        let text = FILE.replace("    netns: /var/run/netns/a\n", "");
        let err = WorkloadSet::parse(Path::new("w.yaml"), &text, "n1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workloads[0].netns"), "{err}");
    }

    #[test]
    fn duplicates_and_unknown_fields_are_rejected() {
        let dup = FILE.replace("198.18.2.10]", "198.18.1.10]");
        let err = WorkloadSet::parse(Path::new("w.yaml"), &dup, "n1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("workloads[1].ips") && err.contains("workloads[0]"),
            "{err}"
        );
        let unknown = FILE.replace("    labels:", "    lables:");
        let err = WorkloadSet::parse(Path::new("w.yaml"), &unknown, "n1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lables") && err.contains("line 13"), "{err}");
        let bad_ip = FILE.replace("198.18.2.10", "198.18.2.300");
        let err = WorkloadSet::parse(Path::new("w.yaml"), &bad_ip, "n1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 12"), "{err}");
    }
}
