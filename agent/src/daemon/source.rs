//! The seam between the daemon and where its workloads come from: the node-local workloads file
//! (polled; tests and nodes outside Kubernetes) or the Kubernetes API with the CNI plugin.
use std::{path::PathBuf, sync::Arc};

use tokio::sync::mpsc;

use super::DaemonError;
use crate::{
    admin::Metrics,
    config::{NodeConfig, WorkloadSet, WorkloadSource},
};

#[cfg(feature = "kubernetes")]
use crate::kube::KubeSource;
#[cfg(feature = "kubernetes")]
pub use crate::kube::{CniJob, Shared as KubeState};
#[cfg(not(feature = "kubernetes"))]
pub use without_kubernetes::{CniJob, KubeState};

/// A build without the `kubernetes` feature (the fuzz targets): no Kubernetes source can exist, so
/// its types are uninhabited and the daemon's code for them compiles to nothing.
#[cfg(not(feature = "kubernetes"))]
mod without_kubernetes {
    use crate::admin::api::KubeStatus;

    pub enum CniJob {}
    pub enum KubeState {}

    impl CniJob {
        pub fn key(&self) -> &str {
            match *self {}
        }
        pub fn answer(self, _enrolled: bool, _error: Option<String>) {
            match self {}
        }
    }

    impl KubeState {
        pub fn status(&self) -> KubeStatus {
            match *self {}
        }
    }
}

pub enum Source {
    File {
        path: PathBuf,
        node: String,
        /// The text last seen, good or bad: a bad file is reported once, not on every tick.
        text: String,
    },
    #[cfg(feature = "kubernetes")]
    Kube(KubeSource),
}

pub enum Update {
    Unchanged,
    Changed(WorkloadSet),
    /// The file changed but is invalid; the last good set stays.
    Rejected(String),
}

impl Source {
    /// Opens the source. The file must be valid at start-up; the Kubernetes source starts empty and
    /// delivers its first set once the API has answered. CNI requests come out of the receiver.
    pub async fn open(
        cfg: &NodeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, Option<WorkloadSet>, Option<mpsc::Receiver<CniJob>>), DaemonError> {
        match &cfg.workloads {
            WorkloadSource::File(path) => {
                let text = crate::config::read_file(path)?;
                let set = WorkloadSet::parse(path, &text, &cfg.node)?;
                let source = Source::File {
                    path: path.clone(),
                    node: cfg.node.clone(),
                    text,
                };
                Ok((source, Some(set), None))
            }
            #[cfg(not(feature = "kubernetes"))]
            WorkloadSource::Kubernetes(_) => {
                let _ = metrics;
                Err(DaemonError::Kube(
                    "the node config has a kubernetes section, but this ferry was built without the kubernetes feature".into(),
                ))
            }
            #[cfg(feature = "kubernetes")]
            WorkloadSource::Kubernetes(k) => {
                let (source, jobs) = KubeSource::start(cfg, k, metrics)
                    .await
                    .map_err(|e| DaemonError::Kube(e.to_string()))?;
                tracing::info!(
                    kubepods_cgroup = %k.kubepods_cgroup.display(),
                    cni_socket = %k.cni_socket.display(),
                    "watching pods and namespaces"
                );
                Ok((Source::Kube(source), None, Some(jobs)))
            }
        }
    }

    pub fn poll(&mut self) -> Update {
        match self {
            Source::File { path, node, text } => match crate::config::read_file(path) {
                Ok(now) if now != *text => {
                    let parsed = WorkloadSet::parse(path, &now, node);
                    *text = now;
                    match parsed {
                        Ok(set) => Update::Changed(set),
                        Err(e) => Update::Rejected(e.to_string()),
                    }
                }
                Ok(_) => Update::Unchanged,
                Err(e) => {
                    tracing::error!(error = %e, "workloads file unreadable; keeping the last good one");
                    Update::Unchanged
                }
            },
            #[cfg(feature = "kubernetes")]
            Source::Kube(k) => k.poll().map_or(Update::Unchanged, Update::Changed),
        }
    }

    pub fn kube(&self) -> Option<Arc<KubeState>> {
        match self {
            #[cfg(feature = "kubernetes")]
            Source::Kube(k) => Some(k.shared.clone()),
            Source::File { .. } => None,
        }
    }
}
