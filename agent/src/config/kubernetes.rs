//! The node config's `kubernetes:` section: where the agent learns its pods from when it runs on a
//! cluster (a pod/namespace watch and the chained CNI plugin instead of a workloads file).
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// The kubelet's cgroup driver, which decides how pod cgroups are named.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`.
    #[default]
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

impl CgroupDriver {
    /// The kubelet's top-level pods cgroup name under this driver.
    pub fn kubepods_dir(self) -> &'static str {
        match self {
            Self::Systemd => "kubepods.slice",
            Self::Cgroupfs => "kubepods",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    cgroup_driver: CgroupDriver,
    kubepods_cgroup: Option<PathBuf>,
    #[serde(default = "default_cni_socket")]
    cni_socket: PathBuf,
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from("/run/ferry/cni.sock")
}

/// Validated `kubernetes:` section.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KubernetesConfig {
    /// A kubeconfig file; without it the agent uses its pod's service account (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    pub cgroup_driver: CgroupDriver,
    /// The kubelet's pods cgroup (`<cgroup_root>/kubepods.slice` or `<cgroup_root>/kubepods` by
    /// default); below `cgroup_root`, where capture is attached.
    pub kubepods_cgroup: PathBuf,
    /// Where the agent answers the `ferry-cni` plugin.
    pub cni_socket: PathBuf,
}

impl KubernetesConfig {
    pub(super) fn validate(
        path: &Path,
        raw: RawKubernetes,
        cgroup_root: &Path,
        abs: impl Fn(PathBuf) -> PathBuf,
    ) -> Result<Self, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: format!("kubernetes.{field}"),
            message,
        };
        // Default: the driver's pods cgroup below cgroup_root, or cgroup_root itself when capture is
        // attached right at the kubelet's pods cgroup.
        let dir = raw.cgroup_driver.kubepods_dir();
        let kubepods_cgroup = raw.kubepods_cgroup.unwrap_or_else(|| {
            if cgroup_root.file_name().is_some_and(|n| n == dir) {
                cgroup_root.to_owned()
            } else {
                cgroup_root.join(dir)
            }
        });
        if !kubepods_cgroup.is_absolute() || !kubepods_cgroup.starts_with(cgroup_root) {
            return Err(invalid(
                "kubepods_cgroup",
                format!(
                    "{} must be cgroup_root {} or below it (capture is attached there)",
                    kubepods_cgroup.display(),
                    cgroup_root.display()
                ),
            ));
        }
        Ok(Self {
            kubeconfig: raw.kubeconfig.map(&abs),
            cgroup_driver: raw.cgroup_driver,
            kubepods_cgroup,
            cni_socket: abs(raw.cni_socket),
        })
    }
}

/// Where the agent learns which pods to enroll.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadSource {
    /// A node-local workloads file, polled for changes (tests, nodes outside Kubernetes).
    File(PathBuf),
    /// The Kubernetes API (pods and namespaces) plus the chained CNI plugin.
    Kubernetes(KubernetesConfig),
}
