//! The Kubernetes workload source: pods and namespaces watched through the API (kube-rs, rustls),
//! this node's meshed pods located by the kubelet's cgroup layout and their netns (from the CNI
//! plugin, or from their processes), and the `ferry-cni` plugin's requests answered.
pub mod cgroup;
pub mod cluster;
pub mod cni;
mod watch;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    admin::{Metrics, api::KubeStatus},
    config::{KubernetesConfig, NodeConfig, WorkloadSet},
};
pub use cluster::Cluster;
pub use cni::CniJob;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("in-cluster Kubernetes config (service account): {0}")]
    InCluster(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
    #[error("binding the CNI socket {path}: {source}")]
    CniSocket {
        path: String,
        source: std::io::Error,
    },
}

/// Connection state of the API: down on any failed request (a watch or the health check), up on
/// any answer.
#[derive(Debug, Default)]
struct ApiState {
    /// Unix seconds of the last change between connected and disconnected.
    since: u64,
    last_error: Option<String>,
    disconnects: u64,
}

/// What the watch tasks, the CNI server and the daemon share.
pub struct Shared {
    cluster: Mutex<Cluster>,
    /// Bumped on every change of the cluster state.
    generation: AtomicU64,
    api: Mutex<ApiState>,
    connected: AtomicBool,
    /// Meshed pods of this node still waiting for their netns, as of the last build.
    pending: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Cluster)) {
        if let Ok(mut c) = self.cluster.lock() {
            f(&mut c);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn with<T>(&self, f: impl FnOnce(&Cluster) -> T) -> Option<T> {
        self.cluster.lock().ok().map(|c| f(&c))
    }

    fn api_up(&self) {
        self.set_api(true, None);
    }

    fn api_down(&self, error: &str) {
        self.set_api(false, Some(error));
    }

    fn set_api(&self, now: bool, error: Option<&str>) {
        let Ok(mut s) = self.api.lock() else { return };
        let was = self.connected.swap(now, Ordering::AcqRel);
        if let Some(e) = error {
            s.last_error = Some(e.to_owned());
        }
        if now != was {
            s.since = unix_now();
            if now {
                tracing::info!("Kubernetes API connected");
            } else {
                s.disconnects += 1;
                tracing::warn!(
                    error = error.unwrap_or(""),
                    "Kubernetes API connection lost; serving the last known pods and retrying"
                );
            }
            self.metrics.kube_api(now);
        }
    }
}

/// The running Kubernetes source.
pub struct KubeSource {
    pub shared: Arc<Shared>,
    node: String,
    cfg: KubernetesConfig,
    applied: Option<u64>,
    pending: usize,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Connects the client (no request yet: the watches retry on their own) and starts the watches
    /// and the CNI socket. CNI requests that need the daemon come out of the returned receiver.
    pub async fn start(
        node: &NodeConfig,
        k: &KubernetesConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, mpsc::Receiver<CniJob>), KubeError> {
        let config = match &k.kubeconfig {
            Some(path) => {
                let err = |message: String| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    message,
                };
                let kc =
                    kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| err(e.to_string()))?
            }
            None => kube::Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?,
        };
        let client =
            kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))?;
        metrics.kube_api(false);
        let shared = Arc::new(Shared {
            cluster: Mutex::new(Cluster::default()),
            generation: AtomicU64::new(0),
            api: Mutex::new(ApiState {
                since: unix_now(),
                ..ApiState::default()
            }),
            connected: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            metrics,
        });
        let listener =
            crate::admin::socket::bind(&k.cni_socket).map_err(|source| KubeError::CniSocket {
                path: k.cni_socket.display().to_string(),
                source,
            })?;
        let (jobs, rx) = mpsc::channel(64);
        let tasks = vec![
            tokio::spawn(watch::pods(client.clone(), shared.clone())),
            tokio::spawn(watch::namespaces(client.clone(), shared.clone())),
            tokio::spawn(watch::health(client, shared.clone())),
            tokio::spawn(cni::serve(listener, shared.clone(), jobs)),
        ];
        let source = Self {
            shared,
            node: node.node.clone(),
            cfg: k.clone(),
            applied: None,
            pending: 0,
            tasks,
        };
        Ok((source, rx))
    }

    /// A new workload set when the cluster changed (or a meshed pod of this node still waits for
    /// its netns); `None` before the first complete list of pods and namespaces, so an agent that
    /// starts without the API keeps the pinned enrollments (fail closed) instead of dropping them.
    pub fn poll(&mut self) -> Option<WorkloadSet> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if self.applied == Some(generation) && self.pending == 0 {
            return None;
        }
        let built = self
            .shared
            .cluster
            .lock()
            .ok()
            .and_then(|mut c| c.synced().then(|| c.build(&self.node, &self.cfg)))?;
        for c in &built.conflicts {
            tracing::warn!(conflict = %c, "pod left out of the workload table");
        }
        self.applied = Some(generation);
        self.pending = built.pending;
        self.shared.pending.store(built.pending, Ordering::Relaxed);
        Some(built.set)
    }

    pub fn status(&self) -> KubeStatus {
        self.shared.status()
    }
}

impl Shared {
    /// The API connection and what the agent knows, for `ferry status`.
    pub fn status(&self) -> KubeStatus {
        let (pods, namespaces, synced) = self
            .with(|c| (c.pods.len(), c.namespaces.len(), c.synced()))
            .unwrap_or_default();
        let api = self.api.lock();
        let (since, last_error, disconnects) = api
            .map(|a| (a.since, a.last_error.clone(), a.disconnects))
            .unwrap_or_default();
        KubeStatus {
            connected: self.connected.load(Ordering::Acquire),
            since,
            last_error,
            disconnects,
            synced,
            pods,
            namespaces,
            waiting_for_netns: self.pending.load(Ordering::Relaxed),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
