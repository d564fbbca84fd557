//! The agent process: loads config, opens capture, keeps pods enrolled as the workloads file changes,
//! and runs the connection handlers until told to stop.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};

mod source;
mod view;

use source::{Source, Update};
use view::AgentView;

use crate::{
    admin::{self, Metrics, metrics::ConfigKind},
    capture::{Capture, EnrolledPod, PodAddrs, PodListeners},
    config::{LocalPod, NodeConfig, WorkloadSet},
    handoff::{self, ListenerKind, OfferedPod},
    identity::{CertStore, Identity, Minter},
    netns::route,
    policy::{self, PolicySet},
    tls,
    tunnel::{Mesh, PodCtx, inbound, outbound},
};

/// How often the workloads file is checked for changes. Polling the content (not inotify) also follows
/// the kubelet's symlink swap of a mounted ConfigMap.
const RELOAD_INTERVAL: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error("installing a signal handler: {0}")]
    Signal(std::io::Error),
    #[error("{what}: {source}")]
    Admin {
        what: String,
        source: std::io::Error,
    },
    #[error("registering a listener of pod {pod}: {source}")]
    Listener { pod: String, source: std::io::Error },
    #[error("taking over from the running agent: {0}")]
    Handoff(#[from] crate::handoff::HandoffError),
    #[error("policies: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("certificates: {0}")]
    Mint(#[from] crate::identity::MintError),
    #[error("workload {workload}: {source}")]
    Identity {
        workload: String,
        source: crate::identity::SpiffeIdError,
    },
    #[error("{0}")]
    Kube(String),
    #[error("TLS for {workload}: {source}")]
    Tls {
        workload: String,
        source: crate::tls::TlsError,
    },
}

/// What a running pod was enrolled with; a change re-enrolls it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodSpec {
    local: LocalPod,
    ips: Vec<std::net::IpAddr>,
    namespace: String,
    service_account: String,
}

struct RunningPod {
    spec: PodSpec,
    enrolled: EnrolledPod,
    tasks: Vec<JoinHandle<()>>,
    /// The accept loops' listeners, kept to offer them to a successor agent.
    listeners: Vec<(ListenerKind, Arc<TcpListener>)>,
    /// Whether the listeners came from a predecessor.
    inherited: bool,
}

struct Daemon {
    cfg: Arc<NodeConfig>,
    capture: Arc<Capture>,
    mesh: Arc<Mesh>,
    pods: HashMap<String, RunningPod>,
    /// Last enroll error per pod, so a pod that keeps failing is logged once per distinct error.
    failing: HashMap<String, String>,
    workloads: Arc<WorkloadSet>,
    /// One clone per live connection: its count tells when draining is done.
    inflight: Arc<()>,
    /// Listeners a predecessor passed over, taken pod by pod as the first reconcile enrolls them.
    incoming: Option<handoff::Incoming>,
}

/// Runs the agent with a loaded config (the CLI applies overrides such as `--node-name` first).
/// `ebpf_object`: an eBPF object to load instead of the built-in one.
pub async fn run(cfg: NodeConfig, ebpf_object: Option<Vec<u8>>) -> Result<(), DaemonError> {
    let cfg = Arc::new(cfg);
    // Probes answer from the start: live at once, ready only once capture is attached, certificates
    // are loaded and the config is valid.
    let startup = Arc::new(Startup::default());
    let http = tokio::net::TcpListener::bind(cfg.admin.http)
        .await
        .map_err(|e| DaemonError::Admin {
            what: format!("binding the admin HTTP address {}", cfg.admin.http),
            source: e,
        })?;
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(admin::serve(http, startup.clone(), async move {
        let _ = http_stopped.await;
    }));
    // On a thread of its own: loading parses the kernel's BTF, megabytes of small allocations, and
    // the freed ones glibc caches per thread would pin their heap pages for good. They go back to
    // the heap when the thread ends, and the trim once ready returns the pages.
    let capture = std::thread::scope(|s| {
        s.spawn(|| match &ebpf_object {
            Some(object) => Capture::open_object(&cfg, object),
            None => Capture::open(&cfg),
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    let capture = Arc::new(capture?);
    tracing::info!(
        node = %cfg.node,
        bpffs_root = %cfg.bpffs_root.display(),
        cgroup_root = %cfg.cgroup_root.display(),
        reopened = capture.reopened,
        "capture attached"
    );
    let certs = match (&cfg.trust_domain, &cfg.certificates) {
        (Some(td), Some(c)) => {
            let minter = Minter::load(&c.dir, td.clone())?.with_ttl(c.workload_ttl)?;
            tracing::info!(trust_domain = %td, dir = %c.dir.display(), "certificates loaded");
            Some(Arc::new(CertStore::new(minter)))
        }
        _ => None,
    };
    let metrics = Arc::new(Metrics::new());
    let (mut source, workloads, mut cni_jobs) = Source::open(&cfg, metrics.clone()).await?;
    {
        let capture = capture.clone();
        metrics.set_capture_source(Box::new(move || {
            capture
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        }));
    }
    let mesh = Arc::new(Mesh::new(&cfg, capture.clone(), certs, metrics));
    let mut policy_watch = PolicyWatch::default();
    if let Some(dir) = &cfg.policies {
        let loaded = PolicySet::load_dir(dir, &cfg.root_namespace)?;
        log_policy_warnings(&loaded.warnings);
        tracing::info!(dir = %dir.display(), policies = loaded.set.len(), "policies loaded");
        mesh.set_policies(loaded.set);
        policy_watch.applied = policy::fingerprint(dir);
    }
    let view = Arc::new(AgentView {
        cfg: cfg.clone(),
        mesh: mesh.clone(),
        capture: capture.clone(),
        started: std::time::Instant::now(),
        ready: std::sync::atomic::AtomicBool::new(false),
        generation: std::sync::atomic::AtomicU64::new(1),
        last_reload: std::sync::Mutex::new(None),
        kube: source.kube(),
    });
    let socket = admin::socket::bind(&cfg.admin.socket).map_err(|e| DaemonError::Admin {
        what: format!("binding the admin socket {}", cfg.admin.socket.display()),
        source: e,
    })?;
    // Which file is ours: during a DaemonSet surge the next agent binds the same path (a shared
    // hostPath) while this one drains, and this one must not remove the newcomer's socket on exit.
    let socket_id = socket_file_id(&cfg.admin.socket);
    tokio::spawn(admin::socket::serve(socket, view.clone()));
    if startup.view.set(view.clone()).is_err() {
        tracing::warn!("admin view set twice");
    }
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    // Without a first set (the Kubernetes API has not answered yet) there is nothing to enroll:
    // pinned enrollments of a previous agent stay, so their pods fail closed instead of leaking, and
    // a running predecessor is not asked for its listeners, since they would all be closed here.
    let workloads = match workloads {
        Some(set) => set,
        None => {
            tracing::info!(
                "waiting for the first workload set before enrolling pods or taking over"
            );
            let mut wait = tokio::time::interval(RELOAD_INTERVAL);
            loop {
                tokio::select! {
                    _ = wait.tick() => {
                        if let Update::Changed(set) = source.poll() {
                            break set;
                        }
                    }
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
            }
        }
    };
    // A running predecessor passes its listeners over; nobody answering means a fresh start.
    let handoff_path = cfg.handoff_socket.clone();
    let this_node = handoff::Node {
        name: cfg.node.clone(),
        bpffs_root: cfg.bpffs_root.clone(),
    };
    let node = this_node.clone();
    let incoming = tokio::task::spawn_blocking(move || handoff::take_over(&handoff_path, &node))
        .await
        .map_err(|e| handoff::HandoffError::Protocol(format!("handoff task: {e}")))??;
    if let Some(i) = &incoming {
        tracing::info!(pods = i.len(), socket = %cfg.handoff_socket.display(), "listeners received from the running agent");
    }
    let mut daemon = Daemon {
        cfg: cfg.clone(),
        capture,
        mesh,
        pods: HashMap::new(),
        failing: HashMap::new(),
        workloads: Arc::new(WorkloadSet::default()),
        inflight: Arc::new(()),
        incoming,
    };
    daemon.set_workloads(workloads);
    daemon.reconcile();
    if let Some(incoming) = daemon.incoming.take() {
        // Listeners of pods this agent did not take are closed with `incoming`.
        let taken = daemon.pods.values().filter(|p| p.inherited).count();
        if !incoming.is_empty() {
            tracing::info!(
                pods = incoming.len(),
                "closing listeners passed over for pods this agent does not enroll"
            );
        }
        let confirm = tokio::task::spawn_blocking(move || incoming.finish(taken)).await;
        match confirm {
            Ok(Ok(())) => tracing::info!(pods = taken, "took over from the running agent"),
            // The predecessor is gone or gave up: the listeners are ours alone now either way.
            Ok(Err(e)) => tracing::warn!(error = %e, "confirming the handoff"),
            Err(e) => tracing::warn!(error = %e, "confirming the handoff"),
        }
    }
    // Ready only now: a successor that is ready has every pod's listeners.
    let handoff_server = handoff::Server::bind(&cfg.handoff_socket)?;
    view.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    // Start-up (loading the eBPF object, minting certificates, the first enrollment) leaves freed
    // heap that glibc would otherwise keep for good: 1.8 MB of an idle agent's 3.3 MB.
    let released = crate::heap::release_free();
    tracing::debug!(
        released,
        "gave the start-up's freed heap back to the kernel"
    );
    tracing::info!(pods = daemon.pods.len(), admin = %cfg.admin.socket.display(), http = %cfg.admin.http, handoff = %cfg.handoff_socket.display(), "ready");

    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    let mut handed_over = false;
    loop {
        tokio::select! {
            conn = handoff_server.accept() => {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff socket");
                        continue;
                    }
                };
                let offer = daemon.offer();
                tracing::info!(pods = offer.len(), "a new agent asks for the listeners");
                let node = this_node.clone();
                match tokio::task::spawn_blocking(move || handoff::give(conn, &node, offer)).await {
                    Ok(Ok(pods)) => {
                        tracing::info!(pods, "handed over to the new agent; no longer accepting");
                        handed_over = true;
                        break;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "handoff failed; still serving"),
                    Err(e) => tracing::warn!(error = %e, "handoff failed; still serving"),
                }
            }
            _ = tick.tick() => {
                daemon.mesh.conns.release_memory_if_shrunk();
                let changed = daemon.apply(source.poll(), &view);
                // Enrollment work only when the workloads changed or a pod still waits to be
                // enrolled: an idle node does no per-pod syscalls on every tick.
                if changed || !daemon.failing.is_empty() {
                    daemon.reconcile();
                }
                if let Some(dir) = &cfg.policies {
                    policy_watch.tick(dir, &cfg.root_namespace, &daemon.mesh, &view);
                }
            }
            Some(job) = next_job(&mut cni_jobs) => {
                // A CNI request changed the cluster state: enroll (or un-enroll) now, so the
                // pod's containers start captured, then say how the pod stands.
                daemon.apply(source.poll(), &view);
                daemon.reconcile();
                let enrolled = daemon.pods.contains_key(job.key());
                let error = daemon.failing.get(job.key()).cloned();
                job.answer(enrolled, error);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    view.ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    handoff_server.close();
    // Connections still draining stay under policy: a reload that denies one closes it here, as the
    // running agent would (after a handoff the successor never sees them).
    let mesh = daemon.mesh.clone();
    let mut stop_requested = false;
    let drain = daemon.shutdown();
    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            _ = tick.tick() => {
                if let Some(dir) = &cfg.policies {
                    policy_watch.tick(dir, &cfg.root_namespace, &mesh, &view);
                }
            }
            _ = term.recv() => stop_requested = true,
            _ = int.recv() => stop_requested = true,
        }
    }
    if handed_over && !stop_requested {
        // Under a DaemonSet, exiting would make the kubelet restart this (older) agent, which would
        // then take the listeners back: stay until told to stop.
        tracing::info!("drained after the handoff; waiting for SIGTERM");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    let _ = http_stop.send(());
    if socket_id.is_some() && socket_file_id(&cfg.admin.socket) == socket_id {
        let _ = std::fs::remove_file(&cfg.admin.socket);
    }
    Ok(())
}

/// (device, inode) of a file, to tell our admin socket from one a later agent bound at the same path.
fn socket_file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The next CNI request, or never without a Kubernetes source.
async fn next_job(
    jobs: &mut Option<tokio::sync::mpsc::Receiver<source::CniJob>>,
) -> Option<source::CniJob> {
    match jobs {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    fn set_workloads(&mut self, set: WorkloadSet) {
        self.workloads = Arc::new(set);
        self.mesh.set_workloads(self.workloads.clone());
    }

    /// Applies a source update; true when the workloads changed.
    fn apply(&mut self, update: Update, view: &AgentView) -> bool {
        match update {
            Update::Unchanged => false,
            Update::Changed(set) => {
                let same = *self.workloads == set;
                self.set_workloads(set);
                if !same {
                    self.mesh.metrics.config_reload(ConfigKind::Workloads, true);
                    view.record_reload("workloads", Ok(()));
                    tracing::info!(workloads = self.workloads.len(), "workloads reloaded");
                }
                !same
            }
            Update::Rejected(e) => {
                self.mesh
                    .metrics
                    .config_reload(ConfigKind::Workloads, false);
                tracing::error!(error = %e, "workloads file rejected; keeping the last good one");
                view.record_reload("workloads", Err(e));
                false
            }
        }
    }

    /// Brings enrolled pods in line with the workloads: enrolls new or changed ones, un-enrolls gone
    /// ones, and retries pods whose enrollment failed (their netns may not exist yet).
    fn reconcile(&mut self) {
        let desired: HashMap<String, PodSpec> = self
            .workloads
            .local()
            .map(|(w, l)| {
                let spec = PodSpec {
                    local: l.clone(),
                    ips: w.ips.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                };
                (w.key(), spec)
            })
            .collect();
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, p)| desired.get(*k) != Some(&p.spec))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(pod) = self.pods.remove(&key) {
                self.stop_pod(&key, pod);
            }
        }
        for (key, spec) in &desired {
            if self.pods.contains_key(key) {
                continue;
            }
            let inherited = self
                .incoming
                .as_mut()
                .and_then(|i| i.take(key))
                .map(inherited_listeners);
            let from_predecessor = inherited.is_some();
            let started = match self.start_pod(key, spec, inherited) {
                // Sockets that do not fit this pod (its netns or the ports changed) are closed;
                // fresh ones are opened.
                Err(DaemonError::Capture(e @ crate::capture::CaptureError::Inherited { .. })) => {
                    tracing::warn!(pod = %key, error = %e, "not using the listeners passed over");
                    self.start_pod(key, spec, None)
                }
                other => other.map(|mut p| {
                    p.inherited = from_predecessor;
                    p
                }),
            };
            match started {
                Ok(pod) => {
                    self.failing.remove(key);
                    tracing::info!(
                        pod = %key,
                        netns_cookie = pod.enrolled.netns_cookie,
                        cgroup_id = pod.enrolled.cgroup_id,
                        "pod enrolled"
                    );
                    self.pods.insert(key.clone(), pod);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.failing.get(key) != Some(&msg) {
                        tracing::error!(pod = %key, error = %msg, "cannot enroll pod; will retry");
                        self.failing.insert(key.clone(), msg);
                    }
                }
            }
        }
        self.failing
            .retain(|k, _| desired.contains_key(k) && !self.pods.contains_key(k));
        // Keep the kernel state of pods we want but could not enroll: their traffic stays captured and
        // so fails closed instead of leaking.
        let keep: Vec<u64> = desired
            .values()
            .filter_map(|p| std::fs::metadata(&p.local.cgroup).ok())
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .collect();
        for id in self.capture.unenroll_stale(&keep) {
            tracing::info!(cgroup_id = id, "stale enrollment removed");
        }
    }

    fn start_pod(
        &self,
        key: &str,
        spec: &PodSpec,
        inherited: Option<PodListeners>,
    ) -> Result<RunningPod, DaemonError> {
        let identity = match &self.cfg.trust_domain {
            Some(td) => Some(
                Identity::new(td.clone(), &spec.namespace, &spec.service_account).map_err(
                    |source| DaemonError::Identity {
                        workload: key.to_owned(),
                        source,
                    },
                )?,
            ),
            None => None,
        };
        let server_tls = match (&self.mesh.certs, &identity) {
            (Some(certs), Some(id)) => Some(
                tls::server_config_for_workload(certs.clone(), id.clone()).map_err(|source| {
                    DaemonError::Tls {
                        workload: key.to_owned(),
                        source,
                    }
                })?,
            ),
            _ => None,
        };
        let addrs = PodAddrs {
            local: &spec.local,
            ips: &spec.ips,
        };
        let (enrolled, listeners) =
            self.capture
                .enroll(&addrs, &self.cfg.ports, &self.cfg.cgroup_root, inherited)?;
        let transparent = match route::prepare_transparent(
            &enrolled.netns,
            route::DEFAULT_MARK,
            route::DEFAULT_TABLE,
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pod = %key, error = %e, "apps of this pod will see the pod's own address as the client's");
                false
            }
        };
        let ctx = Arc::new(PodCtx {
            name: key.to_owned(),
            netns: enrolled.netns.clone(),
            ips: spec.ips.clone(),
            identity,
            server_tls,
            transparent,
        });
        let PodListeners {
            outbound,
            inbound,
            hbone,
        } = listeners;
        let mut tasks = Vec::new();
        let mut kept = Vec::new();
        let mut register = |kind: ListenerKind, l: std::net::TcpListener| {
            // Inherited listeners may come blocking; tokio needs them non-blocking.
            let l = l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map(Arc::new)
                .map_err(|source| DaemonError::Listener {
                    pod: key.to_owned(),
                    source,
                })?;
            kept.push((kind, l.clone()));
            Ok::<_, DaemonError>(l)
        };
        let outbound = outbound
            .into_iter()
            .map(|l| register(ListenerKind::Outbound, l))
            .collect::<Result<Vec<_>, _>>()?;
        let inbound = inbound
            .into_iter()
            .map(|l| register(ListenerKind::Inbound, l))
            .collect::<Result<Vec<_>, _>>()?;
        let hbone = hbone
            .into_iter()
            .map(|l| register(ListenerKind::Hbone, l))
            .collect::<Result<Vec<_>, _>>()?;
        for l in outbound {
            let (ctx, mesh, inflight) = (ctx.clone(), self.mesh.clone(), self.inflight.clone());
            let cookie = enrolled.netns_cookie;
            tasks.push(spawn_accept(l, ctx.name.clone(), move |stream, peer| {
                let (ctx, mesh, guard) = (ctx.clone(), mesh.clone(), inflight.clone());
                async move {
                    let orig = mesh.capture.take_orig_dst(cookie, peer);
                    outbound::handle(&mesh, &ctx, stream, peer, orig).await;
                    drop(guard);
                }
            }));
        }
        for l in inbound {
            let (ctx, mesh, inflight) = (ctx.clone(), self.mesh.clone(), self.inflight.clone());
            tasks.push(spawn_accept(l, ctx.name.clone(), move |stream, peer| {
                let (ctx, mesh, guard) = (ctx.clone(), mesh.clone(), inflight.clone());
                async move {
                    inbound::handle_plaintext(&mesh, &ctx, stream, peer).await;
                    drop(guard);
                }
            }));
        }
        for l in hbone {
            let (ctx, mesh, inflight) = (ctx.clone(), self.mesh.clone(), self.inflight.clone());
            tasks.push(spawn_accept(l, ctx.name.clone(), move |stream, peer| {
                let (ctx, mesh, guard) = (ctx.clone(), mesh.clone(), inflight.clone());
                async move {
                    inbound::handle_hbone(mesh, ctx, stream, peer).await;
                    drop(guard);
                }
            }));
        }
        self.mesh.add_local(ctx);
        Ok(RunningPod {
            spec: spec.clone(),
            enrolled,
            tasks,
            listeners: kept,
            inherited: false,
        })
    }

    fn stop_pod(&self, key: &str, pod: RunningPod) {
        self.mesh.remove_local(key);
        if let Err(e) = self.capture.unenroll(&pod.enrolled) {
            tracing::error!(pod = %key, error = %e, "un-enrolling pod");
        }
        for t in pod.tasks {
            t.abort();
        }
        tracing::info!(pod = %key, "pod un-enrolled");
    }

    /// Every enrolled pod's listeners, duplicated for a successor agent (the originals keep accepting
    /// until it confirms).
    fn offer(&self) -> Vec<OfferedPod> {
        let mut offer = Vec::new();
        for (key, pod) in &self.pods {
            let dup: Result<Vec<_>, _> = pod
                .listeners
                .iter()
                .map(|(kind, l)| {
                    use std::os::fd::AsFd;
                    l.as_fd().try_clone_to_owned().map(|fd| (*kind, fd))
                })
                .collect();
            match dup {
                Ok(listeners) => offer.push(OfferedPod {
                    key: key.clone(),
                    netns_cookie: pod.enrolled.netns_cookie,
                    listeners,
                }),
                // The successor opens this pod's listeners itself once ours are closed.
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "cannot offer this pod's listeners")
                }
            }
        }
        offer
    }

    /// Stops accepting (capture stays attached, so new connections fail closed — or, after a handoff,
    /// go to the successor, which holds the same sockets), lets in-flight connections finish until
    /// the deadline, then returns; pinned state stays for the next agent.
    async fn shutdown(mut self) {
        for pod in self.pods.values() {
            for t in &pod.tasks {
                t.abort();
            }
        }
        // Closes this process's descriptors of the listeners; the sockets live on in a successor.
        self.pods.clear();
        self.mesh.start_draining();
        let deadline = tokio::time::Instant::now() + self.cfg.drain_deadline;
        while Arc::strong_count(&self.inflight) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            unfinished = Arc::strong_count(&self.inflight) - 1,
            "agent stopped"
        );
    }
}

fn spawn_accept<F, Fut>(listener: Arc<TcpListener>, pod: String, handler: F) -> JoinHandle<()>
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(handler(stream, peer));
                }
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(pod = %pod, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A predecessor's listeners sorted by kind, as enrolling takes them.
fn inherited_listeners(pod: handoff::PodSockets) -> PodListeners {
    let mut l = PodListeners {
        outbound: Vec::new(),
        inbound: Vec::new(),
        hbone: Vec::new(),
    };
    for (kind, sock) in pod.listeners {
        match kind {
            ListenerKind::Outbound => l.outbound.push(sock),
            ListenerKind::Inbound => l.inbound.push(sock),
            ListenerKind::Hbone => l.hbone.push(sock),
        }
    }
    l
}

/// The HTTP endpoints' view before the agent is fully up.
#[derive(Default)]
struct Startup {
    view: std::sync::OnceLock<Arc<AgentView>>,
}

impl admin::AdminState for Startup {
    fn metrics(&self) -> String {
        self.view.get().map(|v| v.metrics()).unwrap_or_default()
    }

    fn ready(&self) -> Result<(), String> {
        match self.view.get() {
            Some(v) => v.ready(),
            None => Err("starting: attaching capture and loading certificates".into()),
        }
    }
}

/// Follows the policy directory: a change is applied once it has stayed the same for one tick
/// (debounce, e.g. a ConfigMap update writing several files), swapped atomically, and live connections
/// the new set denies are closed. A bad set is reported and the last good one stays.
#[derive(Default)]
struct PolicyWatch {
    applied: Option<u64>,
    pending: Option<u64>,
}

impl PolicyWatch {
    fn tick(&mut self, dir: &Path, root_ns: &str, mesh: &Mesh, view: &AgentView) {
        let now = policy::fingerprint(dir);
        if now == self.applied {
            self.pending = None;
            return;
        }
        if now != self.pending {
            self.pending = now;
            return;
        }
        self.applied = now;
        self.pending = None;
        match PolicySet::load_dir(dir, root_ns) {
            Ok(loaded) => {
                log_policy_warnings(&loaded.warnings);
                mesh.set_policies(loaded.set);
                mesh.metrics.config_reload(ConfigKind::Policies, true);
                view.record_reload("policies", Ok(()));
                tracing::info!(policies = mesh.policies().len(), "policies reloaded");
                for c in mesh.conns.snapshot() {
                    let Some(p) = &c.policy else { continue };
                    let d = mesh.decide(
                        p.source.as_ref(),
                        p.source_ip,
                        &p.destination,
                        p.destination_addr,
                    );
                    if !d.allowed() {
                        tracing::info!(
                            target: "ferry::policy",
                            id = c.id,
                            pod = %c.pod,
                            src = %c.src,
                            dst = %c.dst,
                            decision = %d,
                            "live connection closed: the new policies deny it"
                        );
                        c.close();
                    }
                }
            }
            Err(e) => {
                mesh.metrics.config_reload(ConfigKind::Policies, false);
                view.record_reload("policies", Err(e.to_string()));
                tracing::error!(error = %e, "policies rejected; keeping the last good set");
            }
        }
    }
}

fn log_policy_warnings(warnings: &[policy::Warning]) {
    for w in warnings {
        tracing::warn!(target: "ferry::policy", at = %w.at, message = %w.message, "policy warning");
    }
}

/// Default location of the node config.
pub fn default_config() -> PathBuf {
    PathBuf::from("/etc/ferry/node.yaml")
}
