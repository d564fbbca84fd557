//! Agent replacement without dropping a connection: the running agent (the predecessor) passes its
//! listening sockets in every pod netns to a new agent (the successor) over a Unix socket with
//! `SCM_RIGHTS`.
//!
//! The sockets themselves move, not copies bound anew: connections queued in a listener's backlog stay
//! queued, and `FERRY_SOCKETS` (a sockhash keyed by pod IP, holding sockets, not descriptors) keeps
//! pointing at the same sockets, so `sk_lookup` never finds a pod without a listener. The conversation:
//!
//! 1. the successor connects to `handoff_socket` and says `Hello` with its protocol version;
//! 2. the predecessor sends one `Pod` message per enrolled pod (key, netns cookie, listener kinds)
//!    carrying that pod's listeners, then `Done`;
//! 3. the successor starts accepting on them and answers `Taken`; only then does the predecessor stop
//!    accepting and drain its live connections. Until `Taken` both accept on the shared sockets (either
//!    may serve a connection; none is refused), and a successor that dies before `Taken` leaves the
//!    predecessor serving as before.
//!
//! Nobody answering on the socket (no file, or one left by a killed agent) means there is no
//! predecessor: the successor opens its own listeners.
mod wire;

use std::{
    collections::HashMap,
    net::TcpListener,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use wire::Message;
pub use wire::{Conn, PROTOCOL_VERSION};

/// How long either side waits for the other's next message.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Whose listeners: a successor of another node (two agents misconfigured with one handoff path) is
/// refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub bpffs_root: PathBuf,
}

/// Which of a pod's listeners a descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// Loopback listener where the pod's captured connects land.
    Outbound,
    /// Plaintext inbound steered by `sk_lookup`.
    Inbound,
    /// HBONE (mutual TLS) from other agents.
    Hbone,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{what} the handoff socket {path}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("sending to the other agent: {0}")]
    Send(nix::Error),
    #[error("receiving from the other agent: {0}")]
    Recv(nix::Error),
    #[error("handoff protocol: {0}")]
    Protocol(String),
    #[error("the other agent refused the handoff: {0}")]
    Refused(String),
}

impl HandoffError {
    fn io(path: &Path, what: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            path: path.to_owned(),
            what,
            source: source.into(),
        }
    }
}

/// One pod's listeners as the predecessor passed them.
#[derive(Debug)]
pub struct PodSockets {
    pub netns_cookie: u64,
    pub listeners: Vec<(ListenerKind, TcpListener)>,
}

/// The successor's side: the listeners received, until it confirms with [`Incoming::finish`].
pub struct Incoming {
    conn: Conn,
    pods: HashMap<String, PodSockets>,
}

impl Incoming {
    /// The listeners of the pod `key`, if the predecessor had it enrolled.
    pub fn take(&mut self, key: &str) -> Option<PodSockets> {
        self.pods.remove(key)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Tells the predecessor that this agent accepts on the listeners now. Listeners of pods this
    /// agent did not take (gone from its workloads) are closed.
    pub fn finish(self, taken: usize) -> Result<(), HandoffError> {
        self.conn.send(&Message::Taken { pods: taken }, &[])
    }

    /// Tells the predecessor to keep serving: this agent could not use what it sent.
    pub fn refuse(self, reason: String) {
        let _ = self.conn.send(&Message::Refused { reason }, &[]);
    }
}

/// Asks a running predecessor for its listeners (blocking). `Ok(None)`: no predecessor answers.
pub fn take_over(path: &Path, node: &Node) -> Result<Option<Incoming>, HandoffError> {
    let Some(conn) = Conn::connect(path, TIMEOUT)? else {
        return Ok(None);
    };
    conn.send(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            node: node.clone(),
        },
        &[],
    )?;
    let mut pods = HashMap::new();
    loop {
        let (msg, fds) = conn.recv()?;
        match msg {
            Message::Pod {
                key,
                netns_cookie,
                listeners,
            } => {
                if listeners.len() != fds.len() {
                    return Err(HandoffError::Protocol(format!(
                        "pod {key}: {} listeners announced, {} descriptors received",
                        listeners.len(),
                        fds.len()
                    )));
                }
                let mut socks = Vec::with_capacity(fds.len());
                for (kind, fd) in listeners.into_iter().zip(fds) {
                    socks.push((kind, tcp_listener(&key, fd)?));
                }
                pods.insert(
                    key,
                    PodSockets {
                        netns_cookie,
                        listeners: socks,
                    },
                );
            }
            Message::Done { pods: n } if n == pods.len() => break,
            Message::Done { pods: n } => {
                return Err(HandoffError::Protocol(format!(
                    "the predecessor announced {n} pods and sent {}",
                    pods.len()
                )));
            }
            Message::Refused { reason } => return Err(HandoffError::Refused(reason)),
            other => {
                return Err(HandoffError::Protocol(format!(
                    "unexpected message {other:?}"
                )));
            }
        }
    }
    Ok(Some(Incoming { conn, pods }))
}

/// A descriptor from the predecessor must be a listening TCP socket: anything else is refused rather
/// than handed to the accept loops.
fn tcp_listener(key: &str, fd: OwnedFd) -> Result<TcpListener, HandoffError> {
    let sock = socket2::Socket::from(fd);
    let listening = sock.is_listener().unwrap_or(false);
    let tcp = matches!(sock.r#type(), Ok(t) if t == socket2::Type::STREAM)
        && matches!(sock.protocol(), Ok(Some(p)) if p == socket2::Protocol::TCP);
    if !(listening && tcp) {
        return Err(HandoffError::Protocol(format!(
            "pod {key}: a descriptor is not a listening TCP socket"
        )));
    }
    Ok(sock.into())
}

/// What the predecessor offers: per pod, its key, netns cookie and (duplicated) listeners.
pub struct OfferedPod {
    pub key: String,
    pub netns_cookie: u64,
    pub listeners: Vec<(ListenerKind, OwnedFd)>,
}

/// The predecessor's side of one conversation (blocking): sends every pod and waits for `Taken`.
/// `Ok(n)`: the successor took over `n` pods; the caller stops accepting.
pub fn give(conn: Conn, ours: &Node, pods: Vec<OfferedPod>) -> Result<usize, HandoffError> {
    match conn.recv()? {
        (Message::Hello { version, node }, _) if version == PROTOCOL_VERSION && node == *ours => {}
        (Message::Hello { version, node }, _) => {
            let reason = if version != PROTOCOL_VERSION {
                format!("handoff protocol version {version}, this agent speaks {PROTOCOL_VERSION}")
            } else {
                format!(
                    "the new agent is for node {} (bpffs {}), this one for node {} (bpffs {})",
                    node.name,
                    node.bpffs_root.display(),
                    ours.name,
                    ours.bpffs_root.display()
                )
            };
            let _ = conn.send(
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(HandoffError::Refused(reason));
        }
        (other, _) => {
            return Err(HandoffError::Protocol(format!(
                "expected hello, got {other:?}"
            )));
        }
    }
    let count = pods.len();
    for pod in &pods {
        let kinds = pod.listeners.iter().map(|(k, _)| *k).collect();
        let fds: Vec<BorrowedFd<'_>> = pod.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        conn.send(
            &Message::Pod {
                key: pod.key.clone(),
                netns_cookie: pod.netns_cookie,
                listeners: kinds,
            },
            &fds,
        )?;
    }
    conn.send(&Message::Done { pods: count }, &[])?;
    match conn.recv()? {
        (Message::Taken { pods }, _) => Ok(pods),
        (Message::Refused { reason }, _) => Err(HandoffError::Refused(reason)),
        (other, _) => Err(HandoffError::Protocol(format!(
            "expected taken, got {other:?}"
        ))),
    }
}

/// The predecessor's listening handoff socket.
pub struct Server {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    /// (device, inode) of the socket file: a successor binds the same path, and this agent must not
    /// remove the successor's file when it exits.
    id: Option<(u64, u64)>,
}

impl Server {
    /// Binds the handoff socket, replacing a file left there (by a predecessor that has handed over
    /// already, or by one that died). Must run inside the tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, HandoffError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| HandoffError::io(path, "creating the directory of", e))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HandoffError::io(path, "removing a stale", e));
            }
        }
        let fd = wire::listen(path)?;
        // Only the agent's own user may take its listeners.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        // SAFETY: the AsyncFd owns the descriptor (an OwnedFd), so it stays open exactly as long as
        // it is registered.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| {
            HandoffError::io(path, "registering", std::io::Error::other(e.to_string()))
        })?;
        Ok(Self {
            fd,
            path: path.to_owned(),
            id: file_id(path),
        })
    }

    /// Waits for a successor to connect.
    pub async fn accept(&self) -> Result<Conn, HandoffError> {
        loop {
            let mut ready = self
                .fd
                .readable()
                .await
                .map_err(|e| HandoffError::io(&self.path, "waiting on", e))?;
            match wire::accept(self.fd.get_ref().as_fd()) {
                Ok(fd) => {
                    return Conn::accepted(fd, TIMEOUT).map_err(|e| {
                        HandoffError::io(&self.path, "configuring a connection on", e)
                    });
                }
                Err(nix::Error::EAGAIN) => ready.clear_ready(),
                Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => {}
                Err(e) => return Err(HandoffError::io(&self.path, "accepting on", e)),
            }
        }
    }

    /// Closes the socket and removes its file unless a successor has bound its own there.
    pub fn close(self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            bpffs_root: "/sys/fs/bpf/ferry".into(),
        }
    }

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").expect("binding on loopback")
    }

    /// The real conversation over a real socket pair of processes' worth: a predecessor thread gives two
    /// pods' listeners, the successor receives the very same sockets (same local addresses, and a
    /// connection queued before the handoff is accepted on the received listener).
    #[tokio::test]
    async fn listeners_pass_whole_and_queued_connections_survive() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("handoff.sock");
        let server = Server::bind(&path).expect("binding");
        let (a, b) = (listener(), listener());
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // Queued in the backlog, never accepted by the predecessor.
        let queued = std::net::TcpStream::connect(a_addr).expect("connecting");
        let offer = vec![
            OfferedPod {
                key: "shop/a".into(),
                netns_cookie: 7,
                listeners: vec![(ListenerKind::Outbound, OwnedFd::from(a))],
            },
            OfferedPod {
                key: "shop/b".into(),
                netns_cookie: 8,
                listeners: vec![(ListenerKind::Hbone, OwnedFd::from(b))],
            },
        ];
        let succ_path = path.clone();
        let successor = std::thread::spawn(move || {
            let mut incoming = take_over(&succ_path, &node("n1"))
                .expect("handoff")
                .expect("a predecessor answers");
            assert_eq!(incoming.len(), 2);
            let a = incoming.take("shop/a").expect("pod a");
            let b = incoming.take("shop/b").expect("pod b");
            incoming.finish(2).expect("confirming");
            (a, b)
        });
        let conn = server.accept().await.expect("accepting");
        let taken = tokio::task::spawn_blocking(move || give(conn, &node("n1"), offer))
            .await
            .expect("joined")
            .expect("giving");
        assert_eq!(taken, 2);
        let (a, b) = successor.join().expect("successor thread");
        assert_eq!(a.netns_cookie, 7);
        assert_eq!(a.listeners[0].0, ListenerKind::Outbound);
        assert_eq!(a.listeners[0].1.local_addr().unwrap(), a_addr);
        assert_eq!(b.listeners[0].0, ListenerKind::Hbone);
        assert_eq!(b.listeners[0].1.local_addr().unwrap(), b_addr);
        let (accepted, _) = a.listeners[0].1.accept().expect("the queued connection");
        assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap());
        server.close();
        assert!(!path.exists());
    }

    #[test]
    fn no_predecessor_when_nobody_answers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("handoff.sock");
        assert!(take_over(&path, &node("n1")).expect("no file").is_none());
        // A file left by a killed agent: bound once, nobody listening any more.
        drop(wire::listen(&path).expect("binding"));
        assert!(path.exists());
        assert!(take_over(&path, &node("n1")).expect("stale file").is_none());
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("handoff.sock");
        let server = Server::bind(&path).expect("binding");
        let p = path.clone();
        let successor = std::thread::spawn(move || {
            let conn = Conn::connect(&p, TIMEOUT).unwrap().unwrap();
            conn.send(
                &Message::Hello {
                    version: 99,
                    node: node("n1"),
                },
                &[],
            )
            .unwrap();
            conn.recv().map(|(m, _)| m)
        });
        let conn = server.accept().await.unwrap();
        let err = tokio::task::spawn_blocking(move || give(conn, &node("n1"), Vec::new()))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
        assert!(matches!(
            successor.join().unwrap(),
            Ok(Message::Refused { reason }) if reason.contains("version 99")
        ));
    }

    #[tokio::test]
    async fn a_successor_of_another_node_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("handoff.sock");
        let server = Server::bind(&path).expect("binding");
        let offer = vec![OfferedPod {
            key: "shop/a".into(),
            netns_cookie: 1,
            listeners: vec![(ListenerKind::Outbound, OwnedFd::from(listener()))],
        }];
        let p = path.clone();
        let successor = std::thread::spawn(move || take_over(&p, &node("n2")).map(|i| i.is_some()));
        let conn = server.accept().await.unwrap();
        let given = tokio::task::spawn_blocking(move || give(conn, &node("n1"), offer))
            .await
            .unwrap();
        assert!(given.is_err());
        let err = successor.join().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("node n2") && err.to_string().contains("node n1"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_descriptor_that_is_not_a_listener_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("handoff.sock");
        let server = Server::bind(&path).expect("binding");
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let offer = vec![OfferedPod {
            key: "shop/a".into(),
            netns_cookie: 1,
            listeners: vec![(ListenerKind::Inbound, OwnedFd::from(not_listening))],
        }];
        let p = path.clone();
        let successor =
            std::thread::spawn(move || take_over(&p, &node("n1")).map(|i| i.map(|i| i.len())));
        let conn = server.accept().await.unwrap();
        let giver = tokio::task::spawn_blocking(move || give(conn, &node("n1"), offer));
        let err = successor.join().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("not a listening TCP socket"),
            "{err}"
        );
        // The predecessor sees the successor go away and keeps serving.
        assert!(giver.await.unwrap().is_err());
    }
}
