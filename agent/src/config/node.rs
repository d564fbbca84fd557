use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    ConfigError,
    kubernetes::{KubernetesConfig, RawKubernetes, WorkloadSource},
    parse_yaml, read_file,
};
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
    ///
    /// Off by default while its guard against repeated bytes (a retransmission overlapping bytes
    /// already carried, which the kernel's verdict is handed whole) has a short record: verified on
    /// one kernel only, and a data plane must not lose or duplicate bytes to be faster. Needs Linux
    /// 6.6 or later with BTF; otherwise the agent warns and relays in userspace.
    pub fast_path: bool,
    /// The most same-node pairs joined at once (1 to 16,384, the default); more are relayed in
    /// userspace. The bound keeps the fast path's maps from evicting a live pair's entry.
    pub fast_path_max_pairs: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            inbound_exclude_ports: Vec::new(),
            fast_path: false,
            fast_path_max_pairs: ferry_common::SPLICE_MAX_PAIRS,
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

/// Bounds on what an inbound HBONE peer (port 15008) may hold. Before its TLS handshake ends a peer is
/// anonymous, so the unfinished handshakes are bounded in time and in number, per source address and
/// in total; after it, the peer is a verified workload but still gets bounded headers, streams and
/// receive windows (the bytes buffered for it).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HboneLimits {
    /// The TLS handshake (and then the HTTP/2 preface) must finish within this.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: std::time::Duration,
    /// Unfinished TLS handshakes of all peers together; past it, new connections are closed at once.
    pub max_pending_handshakes: u32,
    /// Unfinished TLS handshakes from one source address, so that one peer cannot take all the slots.
    pub max_pending_handshakes_per_peer: u32,
    /// A new HBONE connection must send its first CONNECT within this, or it is closed.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: std::time::Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS: further streams are refused (REFUSED_STREAM).
    pub max_streams_per_connection: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE in bytes: a larger CONNECT is answered 431 and its stream refused.
    pub max_header_list_size: u32,
    /// Receive window per stream in bytes: what the agent buffers for one stream whose app reads slowly.
    pub stream_window: u32,
    /// Receive window of a whole connection in bytes (all its streams together).
    pub connection_window: u32,
}

impl Default for HboneLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: std::time::Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_peer: 64,
            request_timeout: std::time::Duration::from_secs(10),
            max_streams_per_connection: 200,
            max_header_list_size: 16 * 1024,
            // ztunnel's windows (hbone.md): peers that interoperate with it expect them for throughput.
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
        }
    }
}

/// HTTP/2 caps a window at 2^31 - 1. Windows below the protocol's initial 65,535 bytes would make
/// every peer wait for WINDOW_UPDATEs after each few frames, so they are refused too.
const MAX_WINDOW: u32 = (1 << 31) - 1;
const MIN_WINDOW: u32 = 65_535;

impl HboneLimits {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("hbone.max_pending_handshakes", self.max_pending_handshakes),
            (
                "hbone.max_pending_handshakes_per_peer",
                self.max_pending_handshakes_per_peer,
            ),
            (
                "hbone.max_streams_per_connection",
                self.max_streams_per_connection,
            ),
        ];
        for (field, n) in positive {
            if n == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if self.max_pending_handshakes_per_peer > self.max_pending_handshakes {
            return Err((
                "hbone.max_pending_handshakes_per_peer",
                format!(
                    "{} exceeds max_pending_handshakes ({})",
                    self.max_pending_handshakes_per_peer, self.max_pending_handshakes
                ),
            ));
        }
        if self.max_header_list_size < 1024 {
            return Err((
                "hbone.max_header_list_size",
                format!(
                    "{} bytes cannot hold a CONNECT request (at least 1024)",
                    self.max_header_list_size
                ),
            ));
        }
        for (field, w) in [
            ("hbone.stream_window", self.stream_window),
            ("hbone.connection_window", self.connection_window),
        ] {
            if !(MIN_WINDOW..=MAX_WINDOW).contains(&w) {
                return Err((
                    field,
                    format!("{w} is outside {MIN_WINDOW}..={MAX_WINDOW} bytes"),
                ));
            }
        }
        if self.stream_window > self.connection_window {
            return Err((
                "hbone.stream_window",
                format!(
                    "{} exceeds connection_window ({})",
                    self.stream_window, self.connection_window
                ),
            ));
        }
        Ok(())
    }
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
    /// Where a running agent offers its pod listeners to its successor (see `handoff`).
    #[serde(default = "default_handoff_socket")]
    handoff_socket: PathBuf,
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
    workloads: Option<PathBuf>,
    kubernetes: Option<RawKubernetes>,
    #[serde(default)]
    inbound: InboundMode,
    /// Plaintext sources delivered even in strict mode: the kubelet's probes.
    #[serde(default)]
    probe_sources: Vec<IpNet>,
    #[serde(default)]
    outbound_unknown: OutboundUnknown,
    #[serde(default)]
    ports: Ports,
    #[serde(default)]
    capture: CaptureConfig,
    #[serde(default)]
    hbone: HboneLimits,
}

fn default_handoff_socket() -> PathBuf {
    PathBuf::from("/run/ferry/handoff.sock")
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
    /// Unix socket through which a new agent takes the listeners over from a running one.
    pub handoff_socket: PathBuf,
    pub drain_deadline: std::time::Duration,
    pub policies: Option<PathBuf>,
    pub root_namespace: String,
    /// Required for mesh traffic (HBONE); without it the agent only captures.
    pub trust_domain: Option<TrustDomain>,
    pub certificates: Option<CertificatesConfig>,
    pub bpffs_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub workloads: WorkloadSource,
    pub inbound: InboundMode,
    /// Sources whose plaintext connections reach the app even in strict mode: the node's address as
    /// the pod sees it, where the kubelet's probes come from.
    pub probe_sources: Vec<IpNet>,
    pub outbound_unknown: OutboundUnknown,
    pub ports: Ports,
    pub capture: CaptureConfig,
    pub hbone: HboneLimits,
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
        raw.hbone
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        let max_pairs = raw.capture.fast_path_max_pairs;
        if !(1..=ferry_common::SPLICE_MAX_PAIRS).contains(&max_pairs) {
            return Err(invalid(
                "capture.fast_path_max_pairs",
                format!(
                    "{max_pairs} is outside 1..={} (a quarter of the fast path's map entries)",
                    ferry_common::SPLICE_MAX_PAIRS
                ),
            ));
        }
        let workloads = match (raw.workloads, raw.kubernetes) {
            (Some(file), None) => WorkloadSource::File(abs(file)),
            (None, Some(k)) => WorkloadSource::Kubernetes(KubernetesConfig::validate(
                path,
                k,
                &raw.cgroup_root,
                abs,
            )?),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "workloads",
                    "give either a workloads file or a kubernetes section, not both".into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "workloads",
                    "missing: give a workloads file or a kubernetes section".into(),
                ));
            }
        };
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
            handoff_socket: abs(raw.handoff_socket),
            drain_deadline: raw.drain_deadline,
            policies: raw.policies.map(&abs),
            root_namespace: raw.root_namespace,
            trust_domain: raw.trust_domain,
            certificates,
            bpffs_root: raw.bpffs_root,
            cgroup_root: raw.cgroup_root,
            workloads,
            inbound: raw.inbound,
            probe_sources: raw.probe_sources,
            outbound_unknown: raw.outbound_unknown,
            ports: raw.ports,
            capture: raw.capture,
            hbone: raw.hbone,
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
        assert_eq!(
            c.workloads,
            WorkloadSource::File(PathBuf::from("/etc/ferry/workloads.yaml"))
        );
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
        // Old and new agent of a rolling update must both see the handoff socket: the shared hostPath.
        let ds_text = std::fs::read_to_string(deploy.join("daemonset.yaml")).unwrap();
        assert!(c.handoff_socket.starts_with("/run/ferry"));
        assert!(ds_text.contains("mountPath: /run/ferry") && ds_text.contains("path: /run/ferry"));
        let WorkloadSource::Kubernetes(k) = &c.workloads else {
            panic!("the shipped config watches the API: {:?}", c.workloads)
        };
        assert_eq!(k.kubeconfig, None, "in-cluster");
        assert_eq!(k.kubepods_cgroup, c.cgroup_root);
        // The CNI socket is on the hostPath the DaemonSet mounts, where the plugin on the host
        // finds it.
        assert!(k.cni_socket.starts_with("/run/ferry"), "{k:?}");
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

    /// The fuzzer's seeds are only useful if they get past the parsers.
    #[test]
    fn fuzz_seeds_parse() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (dir, parse) in [
            (
                "node_config",
                (|t: &str| parse(t).map(drop)) as fn(&str) -> Result<(), ConfigError>,
            ),
            ("workloads", |t: &str| {
                crate::config::WorkloadSet::parse(Path::new("/etc/ferry/w.yaml"), t, "node1")
                    .map(drop)
            }),
        ] {
            let mut n = 0;
            for entry in std::fs::read_dir(seeds.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
            assert!(n >= 1, "{dir}: no seeds");
        }
    }

    #[test]
    fn hbone_limits_default_and_are_validated() {
        let c = parse("node: n\nworkloads: w\nhbone: {handshake_timeout: 3s, max_pending_handshakes: 10, max_pending_handshakes_per_peer: 2}\n")
            .unwrap();
        assert_eq!(c.hbone.handshake_timeout, std::time::Duration::from_secs(3));
        assert_eq!(c.hbone.max_pending_handshakes, 10);
        assert_eq!(c.hbone.max_pending_handshakes_per_peer, 2);
        assert_eq!(
            c.hbone.request_timeout,
            HboneLimits::default().request_timeout
        );
        for (yaml, field) in [
            (
                "{max_pending_handshakes: 0}",
                "hbone.max_pending_handshakes:",
            ),
            (
                "{max_pending_handshakes: 4, max_pending_handshakes_per_peer: 5}",
                "hbone.max_pending_handshakes_per_peer:",
            ),
            ("{max_header_list_size: 100}", "hbone.max_header_list_size:"),
            ("{stream_window: 1000}", "hbone.stream_window:"),
            (
                "{connection_window: 4294967295}",
                "hbone.connection_window:",
            ),
            (
                "{stream_window: 2000000, connection_window: 1000000}",
                "hbone.stream_window:",
            ),
            (
                "{max_streams_per_connection: 0}",
                "hbone.max_streams_per_connection:",
            ),
        ] {
            let err = parse(&format!("node: n\nworkloads: w\nhbone: {yaml}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
        let err = parse("node: n\nworkloads: w\nhbone: {request_timeout: soon}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hbone") && err.contains("soon") && err.contains("line 3"),
            "{err}"
        );
        let err = parse("node: n\nworkloads: w\nhbone: {max_streams: 3}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_streams"), "{err}");
    }

    #[test]
    fn a_kubernetes_section_replaces_the_workloads_file_and_is_validated() {
        let c = parse(
            "node: n1\ncgroup_root: /sys/fs/cgroup\nkubernetes: {cgroup_driver: cgroupfs}\nprobe_sources: [10.244.1.1/32]\n",
        )
        .unwrap();
        let WorkloadSource::Kubernetes(k) = &c.workloads else {
            panic!("{:?}", c.workloads)
        };
        assert_eq!(k.kubepods_cgroup, PathBuf::from("/sys/fs/cgroup/kubepods"));
        assert_eq!(k.cni_socket, PathBuf::from("/run/ferry/cni.sock"));
        assert!(k.kubeconfig.is_none(), "in-cluster by default");
        assert_eq!(c.probe_sources.len(), 1);
        // Attached at the kubelet's own pods cgroup: that is the pods cgroup.
        let c = parse(
            "node: n1\ncgroup_root: /sys/fs/cgroup/kubepods.slice\nkubernetes: {kubeconfig: kc}\n",
        )
        .unwrap();
        let WorkloadSource::Kubernetes(k) = &c.workloads else {
            panic!("{:?}", c.workloads)
        };
        assert_eq!(
            k.kubepods_cgroup,
            PathBuf::from("/sys/fs/cgroup/kubepods.slice")
        );
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/etc/ferry/kc")));
        for (text, needle) in [
            ("node: n1\nworkloads: w\nkubernetes: {}\n", "not both"),
            ("node: n1\n", "workloads"),
            ("node: n1\nkubernetes: {cgroup_driver: docker}\n", "line 2"),
            (
                "node: n1\nkubernetes: {kubepods_cgroup: /elsewhere}\n",
                "kubernetes.kubepods_cgroup",
            ),
            ("node: n1\nkubernetes: {watch: true}\n", "watch"),
            ("node: n1\nworkloads: w\nprobe_sources: [node]\n", "line 3"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
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

    #[test]
    fn the_fast_path_pair_cap_defaults_to_its_bound_and_refuses_beyond_it() {
        let c = parse("node: n1\nworkloads: w\n").unwrap();
        assert_eq!(c.capture.fast_path_max_pairs, 16_384);
        let c = parse("node: n1\nworkloads: w\ncapture: {fast_path_max_pairs: 1}\n").unwrap();
        assert_eq!(c.capture.fast_path_max_pairs, 1);
        for n in [0, 16_385] {
            let err = parse(&format!(
                "node: n1\nworkloads: w\ncapture: {{fast_path_max_pairs: {n}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("capture.fast_path_max_pairs") && err.contains("1..=16384"),
                "{n}: {err}"
            );
        }
    }
}
