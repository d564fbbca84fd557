//! The agent's side of the `ferry-cni` plugin: a Unix socket (mode 0600) taking one JSON request
//! line and answering one reply line. ADD registers the sandbox's netns and addresses and waits
//! until the daemon has enrolled the pod, so the pod's containers start captured; DEL un-enrolls;
//! CHECK reports whether a pod that must be meshed is enrolled.
use std::{sync::Arc, time::Duration};

use ferry_cni::{PodRef, Reply, Request};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{Shared, cluster::CniPod};

const MAX_REQUEST: u64 = 64 * 1024;
/// How long an ADD waits for the pod watch to show a pod the kubelet just started: the kubelet
/// learned of the pod from the same API a moment before.
const POD_WAIT: Duration = Duration::from_secs(10);
const DAEMON_WAIT: Duration = Duration::from_secs(20);

/// Asks the daemon to bring enrollment in line with the cluster now and say how `key` stands.
pub struct CniJob {
    pub key: String,
    pub reply: oneshot::Sender<Enrollment>,
}

impl CniJob {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Tells the waiting request how the pod stands (it may have given up waiting: then nobody
    /// listens, which is fine).
    pub fn answer(self, enrolled: bool, error: Option<String>) {
        let _ = self.reply.send(Enrollment { enrolled, error });
    }
}

#[derive(Debug, Default)]
pub struct Enrollment {
    pub enrolled: bool,
    /// The pod's last enroll error, when it is wanted but not enrolled.
    pub error: Option<String>,
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>, jobs: mpsc::Sender<CniJob>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (shared, jobs) = (shared.clone(), jobs.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &shared, &jobs).await {
                tracing::warn!(error = %e, "CNI request");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    shared: &Shared,
    jobs: &mpsc::Sender<CniJob>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => handle(req, shared, jobs).await,
        Err(e) => Reply::failed(false, format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

async fn handle(req: Request, shared: &Shared, jobs: &mpsc::Sender<CniJob>) -> Reply {
    let pod = match &req {
        Request::Add { pod, .. } | Request::Del { pod } | Request::Check { pod } => pod.clone(),
    };
    let key = pod.key();
    let meshed = match req {
        Request::Del { .. } => {
            shared.update(|c| {
                c.cni.remove(&key);
                c.deleted.insert(key.clone(), pod.uid.clone());
            });
            let state = enrollment(&key, jobs).await;
            tracing::info!(pod = %key, container = %pod.container_id, "CNI DEL");
            return match state {
                Ok(e) if e.enrolled => Reply::failed(true, "still enrolled after DEL"),
                Ok(_) => Reply::done(false),
                Err(e) => Reply::failed(false, e),
            };
        }
        Request::Add { netns, ips, .. } => {
            let meshed = match wait_for_pod(shared, &pod).await {
                Ok(m) => m,
                Err(e) => return Reply::failed(false, e),
            };
            if !meshed {
                tracing::info!(pod = %key, "CNI ADD: pod is not meshed");
                return Reply::done(false);
            }
            shared.update(|c| {
                c.deleted.remove(&key);
                c.cni.insert(
                    key.clone(),
                    CniPod {
                        uid: pod.uid.clone(),
                        netns: netns.into(),
                        ips,
                    },
                );
            });
            true
        }
        Request::Check { .. } => {
            match shared
                .with(|c| (c.synced(), c.meshed(&key)))
                .unwrap_or_default()
            {
                (false, _) => {
                    return Reply::failed(false, "the agent has not listed the cluster's pods yet");
                }
                (true, None) => return Reply::failed(false, format!("pod {key} is not known")),
                (true, Some(false)) => return Reply::done(false),
                (true, Some(true)) => true,
            }
        }
    };
    match enrollment(&key, jobs).await {
        Ok(e) if e.enrolled => {
            tracing::info!(pod = %key, container = %pod.container_id, "CNI: pod enrolled");
            Reply::done(meshed)
        }
        Ok(e) => Reply::failed(
            meshed,
            format!(
                "pod {key} is meshed but not enrolled: {}",
                e.error.unwrap_or_else(|| "waiting for its netns".into())
            ),
        ),
        Err(e) => Reply::failed(meshed, e),
    }
}

/// Whether the pod is meshed, once the watch has it (the uid must match when both are known).
async fn wait_for_pod(shared: &Shared, pod: &PodRef) -> Result<bool, String> {
    let key = pod.key();
    let deadline = tokio::time::Instant::now() + POD_WAIT;
    loop {
        let seen = shared
            .with(|c| {
                let p = c.pods.get(&key)?;
                let same = pod.uid.as_deref().is_none_or(|u| u == p.uid);
                (same && c.synced()).then(|| c.meshed(&key).unwrap_or(false))
            })
            .flatten();
        if let Some(m) = seen {
            return Ok(m);
        }
        if tokio::time::Instant::now() >= deadline {
            // Fail closed: without knowing the pod the agent cannot tell whether it must be
            // meshed, and the kubelet retries a failed ADD.
            return Err(format!(
                "pod {key} is not (yet) known from the Kubernetes API; cannot tell whether it is meshed"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn enrollment(key: &str, jobs: &mpsc::Sender<CniJob>) -> Result<Enrollment, String> {
    let (tx, rx) = oneshot::channel();
    jobs.send(CniJob {
        key: key.to_owned(),
        reply: tx,
    })
    .await
    .map_err(|_| "the agent is shutting down".to_string())?;
    match tokio::time::timeout(DAEMON_WAIT, rx).await {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(_)) => Err("the agent is shutting down".into()),
        Err(_) => Err("the agent did not finish enrolling in time".into()),
    }
}
