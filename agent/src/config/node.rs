use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::{ConfigError, parse_yaml, read_file};
use crate::identity::TrustDomain;

/// What the agent does with inbound plaintext connections from outside the mesh.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// Refused and counted: only HBONE reaches mesh pods.
    #[default]
    Strict,
    /// Delivered to the app, as plain TCP.
    Permissive,
}

/// What the agent does with captured connections to destinations outside the mesh.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundUnknown {
    /// Connected from inside the source pod's netns, as the app would have without a mesh.
    #[default]
    Passthrough,
    Refuse,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// The agent's outbound listener, on loopback inside every enrolled pod netns.
    pub outbound: u16,
    /// The agent's plaintext inbound listener, on loopback inside every enrolled pod netns.
    pub inbound: u16,
    pub hbone: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: 15001,
            inbound: 15006,
            hbone: 15008,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Outbound destination ports never captured.
    pub exclude_ports: Vec<u16>,
    /// Outbound destination networks never captured.
    pub exclude_cidrs: Vec<IpNet>,
    /// Inbound ports passed straight to the app (e.g. probes) — plaintext, so choose with care.
    pub inbound_exclude_ports: Vec<u16>,
    /// Join the two sockets of an authorized same-node connection in the kernel (sockhash + sk_skb
    /// verdict), so its bytes no longer cross userspace. Off: relayed in userspace.
    pub fast_path: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            inbound_exclude_ports: Vec::new(),
            fast_path: true,
        }
    }
}

/// Where the node's certificate material lives and how long workload certificates last.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatesConfig {
    /// Directory with `node.pem`, `node.key` and `bundle.pem` (from `ferry ca issue-node`); relative
    /// to the config file.
    pub dir: PathBuf,
    /// Lifetime of workload certificates (`90s`, `30m`, `24h`, `7d`); renewed at half-life.
    #[serde(default = "default_ttl", deserialize_with = "duration")]
    pub workload_ttl: std::time::Duration,
}

fn default_drain() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn default_root_namespace() -> String {
    "istio-system".into()
}

fn default_ttl() -> std::time::Duration {
    crate::identity::DEFAULT_TTL
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration (a number followed by s, m, h or d, e.g. 24h)"
        ))
    })
}

pub(crate) fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

/// Where operators reach the agent.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The CLI's Unix socket (mode 0600).
    pub socket: PathBuf,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub http: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/ferry/admin.sock"),
            http: std::net::SocketAddr::from(([127, 0, 0, 1], 15020)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeConfig {
    #[serde(default)]
    admin: AdminConfig,
    /// How long in-flight connections may finish after SIGTERM.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    drain_deadline: std::time::Duration,
    /// Directory of Istio AuthorizationPolicy files.
    policies: Option<PathBuf>,
    #[serde(default = "default_root_namespace")]
    root_namespace: String,
    node: String,
    trust_domain: Option<TrustDomain>,
    certificates: Option<CertificatesConfig>,
    #[serde(default = "default_bpffs_root")]
    bpffs_root: PathBuf,
    #[serde(default = "default_cgroup_root")]
    cgroup_root: PathBuf,
    workloads: PathBuf,
    #[serde(default)]
    inbound: InboundMode,
    #[serde(default)]
    outbound_unknown: OutboundUnknown,
    #[serde(default)]
    ports: Ports,
    #[serde(default)]
    capture: CaptureConfig,
}

fn default_bpffs_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/ferry")
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/unified")
}

/// The validated node config. Relative paths in the file are resolved against the file's directory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeConfig {
    pub path: PathBuf,
    pub node: String,
    pub admin: AdminConfig,
    pub drain_deadline: std::time::Duration,
    pub policies: Option<PathBuf>,
    pub root_namespace: String,
    /// Required for mesh traffic (HBONE); without it the agent only captures.
    pub trust_domain: Option<TrustDomain>,
    pub certificates: Option<CertificatesConfig>,
    pub bpffs_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub workloads: PathBuf,
    pub inbound: InboundMode,
    pub outbound_unknown: OutboundUnknown,
    pub ports: Ports,
    pub capture: CaptureConfig,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, &read_file(path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawNodeConfig = parse_yaml(path, text)?;
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            message,
        };
        check_node_name(path, "node", &raw.node)?;
        let p = raw.ports;
        for (field, port) in [
            ("ports.outbound", p.outbound),
            ("ports.inbound", p.inbound),
            ("ports.hbone", p.hbone),
        ] {
            if port == 0 {
                return Err(invalid(field, "port 0 is not allowed".into()));
            }
        }
        if p.outbound == p.inbound || p.outbound == p.hbone || p.inbound == p.hbone {
            return Err(invalid(
                "ports",
                "outbound, inbound and hbone ports must differ".into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        for (field, dir) in [
            ("bpffs_root", &raw.bpffs_root),
            ("cgroup_root", &raw.cgroup_root),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
        }
        if raw.trust_domain.is_some() != raw.certificates.is_some() {
            return Err(invalid(
                "certificates",
                "trust_domain and certificates go together: mesh traffic needs both".into(),
            ));
        }
        let certificates = raw.certificates.map(|c| CertificatesConfig {
            dir: abs(c.dir),
            ..c
        });
        Ok(Self {
            path: path.to_owned(),
            node: raw.node,
            admin: AdminConfig {
                socket: abs(raw.admin.socket),
                ..raw.admin
            },
            drain_deadline: raw.drain_deadline,
            policies: raw.policies.map(&abs),
            root_namespace: raw.root_namespace,
            trust_domain: raw.trust_domain,
            certificates,
            bpffs_root: raw.bpffs_root,
            cgroup_root: raw.cgroup_root,
            workloads: abs(raw.workloads),
            inbound: raw.inbound,
            outbound_unknown: raw.outbound_unknown,
            ports: raw.ports,
            capture: raw.capture,
        })
    }
}

impl NodeConfig {
    /// Replaces the file's `node` with `name` (`ferry run --node-name`, from the downward API's
    /// `spec.nodeName` on Kubernetes, where one ConfigMap serves every node), validated as the file's
    /// value is: the name decides which workloads are this node's pods.
    pub fn with_node_name(mut self, name: &str) -> Result<Self, ConfigError> {
        check_node_name(&self.path, "node (--node-name)", name)?;
        self.node = name.to_owned();
        Ok(self)
    }
}

fn check_node_name(path: &Path, field: &str, name: &str) -> Result<(), ConfigError> {
    if is_dns_label(name) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        path: path.to_owned(),
        field: field.to_owned(),
        message: format!("{name:?} is not a valid node name (lowercase letters, digits, '-', '.')"),
    })
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(Path::new("/etc/ferry/node.yaml"), text)
    }

    #[test]
    fn minimal_file_gets_defaults_and_resolves_relative_paths() {
        let c = parse("node: n1\nworkloads: workloads.yaml\n").unwrap();
        assert_eq!(c.workloads, PathBuf::from("/etc/ferry/workloads.yaml"));
        assert_eq!(c.bpffs_root, PathBuf::from("/sys/fs/bpf/ferry"));
        assert_eq!(c.inbound, InboundMode::Strict);
        assert_eq!(c.ports.hbone, 15008);
    }

    #[test]
    fn certificates_resolve_against_the_config_dir_and_parse_ttls() {
        let c = parse("node: n1\nworkloads: w\ntrust_domain: cluster.local\ncertificates: {dir: certs, workload_ttl: 90s}\n")
            .unwrap();
        let certs = c.certificates.unwrap();
        assert_eq!(certs.dir, PathBuf::from("/etc/ferry/certs"));
        assert_eq!(certs.workload_ttl, std::time::Duration::from_secs(90));
        assert_eq!(
            parse_duration("2h"),
            Some(std::time::Duration::from_secs(7200))
        );
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("h"), None);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = parse("node: n1\nworkloads: w.yaml\ncapture:\n  exclude_prots: [22]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/ferry/node.yaml"), "{err}");
        assert!(err.contains("exclude_prots"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn node_name_override_replaces_the_file_value_and_is_validated() {
        let c = parse("node: placeholder\nworkloads: w\n").unwrap();
        let c = c.with_node_name("worker-2.example").unwrap();
        assert_eq!(c.node, "worker-2.example");
        let err = parse("node: n1\nworkloads: w\n")
            .unwrap()
            .with_node_name("Worker_2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--node-name") && err.contains("Worker_2"),
            "{err}"
        );
        assert!(
            parse("node: n1\nworkloads: w\n")
                .unwrap()
                .with_node_name("")
                .is_err()
        );
    }

    /// The node config shipped in deploy/config.yaml (a ConfigMap) parses, serves the kubelet's probes
    /// on the pod IP, and drains within the DaemonSet's termination grace period.
    #[test]
    fn the_kubernetes_configmap_config_parses_and_fits_the_daemonset() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let read = |name: &str| -> serde_yaml::Value {
            let text = std::fs::read_to_string(deploy.join(name)).unwrap();
            serde_yaml::from_str(&text).unwrap()
        };
        let cm = read("config.yaml");
        let text = cm["data"]["node.yaml"].as_str().unwrap();
        let c = NodeConfig::parse(Path::new("/etc/ferry/node.yaml"), text)
            .unwrap()
            .with_node_name("worker-1")
            .unwrap();
        assert_eq!(c.admin.http.to_string(), "0.0.0.0:15020");
        assert_eq!(c.workloads, PathBuf::from("/etc/ferry/workloads.yaml"));
        assert_eq!(
            c.certificates.unwrap().dir,
            PathBuf::from("/etc/ferry/certs")
        );
        let ds = read("daemonset.yaml");
        let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(
            c.drain_deadline < std::time::Duration::from_secs(grace),
            "drain_deadline {:?} must end before the kubelet kills the agent ({grace}s)",
            c.drain_deadline
        );
    }

    #[test]
    fn bad_values_are_errors_naming_the_field() {
        let err = parse("node: n1\nworkloads: w\ncapture:\n  exclude_cidrs: [10.0.0.0/33]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        let err = parse("node: N_1\nworkloads: w\n").unwrap_err().to_string();
        assert!(err.contains("node:"), "{err}");
        let err = parse("node: n\nworkloads: w\nports: {outbound: 15008}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ports"), "{err}");
        let err = parse("node: n\nworkloads: w\ninbound: open\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("inbound") && err.contains("line 3"), "{err}");
    }
}
