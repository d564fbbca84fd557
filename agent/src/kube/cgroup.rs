//! Where the kubelet puts a pod's cgroup, for both cgroup drivers and every QoS class, and finding a
//! pod's network namespace from the processes in it.
use std::path::{Path, PathBuf};

use crate::config::{CgroupDriver, KubernetesConfig};

/// A pod's Kubernetes QoS class (`status.qosClass`), which decides its parent cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [Self::Guaranteed, Self::Burstable, Self::BestEffort];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The kubelet's name for the class's cgroup (none for Guaranteed, whose pods sit directly below
    /// the pods cgroup).
    fn dir(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// The pod cgroup the kubelet creates for a pod of `uid` and `qos`:
/// - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice`
///   (Guaranteed: `kubepods.slice/kubepods-pod<uid>.slice`);
/// - cgroupfs: `kubepods/burstable/pod<uid>` (Guaranteed: `kubepods/pod<uid>`).
pub fn pod_cgroup(k: &KubernetesConfig, uid: &str, qos: QosClass) -> PathBuf {
    let root = &k.kubepods_cgroup;
    match k.cgroup_driver {
        CgroupDriver::Systemd => {
            // systemd unit names use '-' as the hierarchy separator, so the kubelet escapes the
            // uid's dashes as underscores.
            let uid = uid.replace('-', "_");
            match qos.dir() {
                None => root.join(format!("kubepods-pod{uid}.slice")),
                Some(q) => root
                    .join(format!("kubepods-{q}.slice"))
                    .join(format!("kubepods-{q}-pod{uid}.slice")),
            }
        }
        CgroupDriver::Cgroupfs => match qos.dir() {
            None => root.join(format!("pod{uid}")),
            Some(q) => root.join(q).join(format!("pod{uid}")),
        },
    }
}

/// The pod's cgroup for its QoS class, or when the class is not known yet, whichever of the three
/// candidates exists.
pub fn find_pod_cgroup(k: &KubernetesConfig, uid: &str, qos: Option<QosClass>) -> PathBuf {
    if let Some(q) = qos {
        return pod_cgroup(k, uid, q);
    }
    QosClass::ALL
        .iter()
        .map(|q| pod_cgroup(k, uid, *q))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| pod_cgroup(k, uid, QosClass::BestEffort))
}

/// The network namespace of a process running in `cgroup` or below it (a container's cgroup), as a
/// `/proc/<pid>/ns/net` path; `None` while no process runs there yet.
pub fn netns_from_cgroup(cgroup: &Path) -> Option<PathBuf> {
    fn first_pid(dir: &Path, depth: u32) -> Option<u32> {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
        if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
            return Some(pid);
        }
        if depth == 0 {
            return None;
        }
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .find_map(|e| first_pid(&e.path(), depth - 1))
    }
    let pid = first_pid(cgroup, 3)?;
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    path.exists().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(driver: CgroupDriver, root: &str) -> KubernetesConfig {
        KubernetesConfig {
            kubeconfig: None,
            cgroup_driver: driver,
            kubepods_cgroup: PathBuf::from(root),
            cni_socket: PathBuf::from("/run/ferry/cni.sock"),
        }
    }

    const UID: &str = "4a3f1c2e-7b9d-4e1f-a2b3-c4d5e6f70819";

    #[test]
    fn systemd_layout_for_every_qos_class() {
        let k = cfg(CgroupDriver::Systemd, "/sys/fs/cgroup/kubepods.slice");
        let u = "4a3f1c2e_7b9d_4e1f_a2b3_c4d5e6f70819";
        assert_eq!(
            pod_cgroup(&k, UID, QosClass::Guaranteed),
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod{u}.slice"
            ))
        );
        assert_eq!(
            pod_cgroup(&k, UID, QosClass::Burstable),
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
            ))
        );
        assert_eq!(
            pod_cgroup(&k, UID, QosClass::BestEffort),
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
            ))
        );
    }

    #[test]
    fn cgroupfs_layout_for_every_qos_class() {
        let k = cfg(CgroupDriver::Cgroupfs, "/sys/fs/cgroup/kubepods");
        assert_eq!(
            pod_cgroup(&k, UID, QosClass::Guaranteed),
            PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{UID}"))
        );
        assert_eq!(
            pod_cgroup(&k, UID, QosClass::Burstable),
            PathBuf::from(format!("/sys/fs/cgroup/kubepods/burstable/pod{UID}"))
        );
        assert_eq!(
            pod_cgroup(&k, UID, QosClass::BestEffort),
            PathBuf::from(format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID}"))
        );
    }

    #[test]
    fn an_unknown_class_finds_the_existing_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kubepods");
        let k = cfg(CgroupDriver::Cgroupfs, &root.to_string_lossy());
        let burstable = root.join("burstable").join(format!("pod{UID}"));
        std::fs::create_dir_all(&burstable).unwrap();
        assert_eq!(find_pod_cgroup(&k, UID, None), burstable);
        assert_eq!(QosClass::parse("Burstable"), Some(QosClass::Burstable));
        assert_eq!(QosClass::parse("burstable"), None);
    }
}
