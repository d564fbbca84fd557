//! Loopback test world for the HBONE layer: an HBONE server with a handler that dials real TCP
//! upstreams, a few upstream services, and a proxy whose connections can be cut.
#![allow(dead_code)] // Each test binary uses a different part.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::tunnel::{
    ClientConfig, ConnectRequest, CopyOutcome, HboneClient, HboneServer, Reject, ServerConfig,
    TunnelError, Upstream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Any test that waits on the network gives up after this, so a hang fails instead of blocking.
pub const LIMIT: Duration = Duration::from_secs(10);

pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no result within {LIMIT:?}"),
    }
}

/// Deterministic bytes that differ per `seed`, so swapped or shifted data is detected.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(i as u32 >> 11) as u8 ^ seed)
        .collect()
}

pub fn client_config() -> ClientConfig {
    ClientConfig {
        keepalive: None,
        ..ClientConfig::default()
    }
}

/// An HBONE server on loopback whose handler dials the target over TCP.
pub struct Harness {
    pub addr: SocketAddr,
    /// Each request the handler saw.
    pub requests: mpsc::UnboundedReceiver<ConnectRequest>,
    /// `(peer address, serve_connection result)` of each finished inbound connection.
    pub results: mpsc::UnboundedReceiver<(SocketAddr, Result<(), TunnelError>)>,
    /// Outcome of each relay that ran.
    pub relays: mpsc::UnboundedReceiver<Result<CopyOutcome, String>>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept_task: AbortHandle,
}

pub struct HarnessOptions {
    pub denied: HashSet<SocketAddr>,
    pub expected_local_ip: Option<IpAddr>,
    pub config: ServerConfig,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        HarnessOptions {
            denied: HashSet::new(),
            expected_local_ip: None,
            config: ServerConfig {
                keepalive: None,
                ..ServerConfig::default()
            },
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(HarnessOptions::default()).await
    }

    pub async fn start_with(options: HarnessOptions) -> Harness {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (res_tx, results) = mpsc::unbounded_channel();
        let (relay_tx, relays) = mpsc::unbounded_channel();
        let denied = Arc::new(options.denied);
        let handler = Arc::new(move |req: ConnectRequest| {
            let denied = denied.clone();
            let req_tx = req_tx.clone();
            let relay_tx = relay_tx.clone();
            async move {
                let target = req.target;
                let _ = req_tx.send(req);
                if denied.contains(&target) {
                    return Err(Reject::Denied);
                }
                let stream =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target))
                        .await
                        .map_err(|_| Reject::Unreachable)?
                        .map_err(|_| Reject::Unreachable)?;
                Ok(Upstream::new(stream).on_complete(move |r| {
                    let _ = relay_tx.send(r.as_ref().map(|o| *o).map_err(|e| e.to_string()));
                }))
            }
        });
        let server = HboneServer::new(handler, options.config);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let conns = connections.clone();
        let expected = options.expected_local_ip;
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((sock, peer)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                let res_tx = res_tx.clone();
                let task = tokio::spawn(async move {
                    let r = server.serve_connection(sock, expected).await;
                    let _ = res_tx.send((peer, r));
                });
                conns.lock().expect("lock").push(task.abort_handle());
            }
        })
        .abort_handle();
        Harness {
            addr,
            requests,
            results,
            relays,
            connections,
            accept_task,
        }
    }

    pub async fn client(&self) -> HboneClient {
        let tcp = TcpStream::connect(self.addr)
            .await
            .expect("connect to HBONE server");
        HboneClient::handshake_with(tcp, client_config())
            .await
            .expect("HBONE handshake")
    }

    /// Drops every inbound connection at once (TCP close), as a crashing peer would.
    pub fn kill_connections(&self) {
        for c in self.connections.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    /// The serve_connection result for the connection from `peer`.
    pub async fn result_for(&mut self, peer: SocketAddr) -> Result<(), TunnelError> {
        loop {
            let (from, r) = within("serve_connection result", self.results.recv())
                .await
                .expect("harness alive");
            if from == peer {
                return r;
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.kill_connections();
    }
}

/// Binds a loopback listener and serves each connection with `f`.
pub async fn upstream<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((LOCALHOST, 0))
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(f(sock));
        }
    });
    addr
}

/// Echoes everything; at EOF, shuts down its write half. Reports how each connection ended.
pub async fn echo_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<std::io::Result<u64>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = upstream(move |sock| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = sock.into_split();
            let res = async {
                let n = tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                Ok(n)
            }
            .await;
            let _ = tx.send(res);
        }
    })
    .await;
    (addr, rx)
}

/// An address where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    l.local_addr().expect("local addr")
}

/// Reads everything until EOF, then answers `got <n>` and closes.
pub async fn reply_after_eof_upstream() -> SocketAddr {
    upstream(|mut sock| async move {
        let mut all = Vec::new();
        if sock.read_to_end(&mut all).await.is_ok() {
            let _ = sock
                .write_all(format!("got {}", all.len()).as_bytes())
                .await;
            let _ = sock.shutdown().await;
        }
    })
    .await
}

/// Speaks first and half-closes, then reports what it receives until EOF.
pub async fn speak_first_upstream(
    greeting: &'static [u8],
) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = upstream(move |mut sock| {
        let tx = tx.clone();
        async move {
            if sock.write_all(greeting).await.is_err() || sock.shutdown().await.is_err() {
                return;
            }
            let mut all = Vec::new();
            if sock.read_to_end(&mut all).await.is_ok() {
                let _ = tx.send(all);
            }
        }
    })
    .await;
    (addr, rx)
}

/// A TCP proxy to `target` whose connections can all be cut at once.
pub struct CutProxy {
    pub addr: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind proxy");
        let addr = listener.local_addr().expect("local addr");
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let t = tasks.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                t.lock().expect("lock").push(task.abort_handle());
            }
        });
        CutProxy { addr, tasks }
    }

    pub fn cut(&self) {
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}
