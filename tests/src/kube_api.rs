//! A local stand-in for the Kubernetes API server: the real list/watch protocol (lists with a
//! `resourceVersion`, watch streams of `WatchEvent` lines resumed from a resourceVersion, chunked
//! HTTP/1.1) over plain HTTP on 127.0.0.1 in a node's netns, serving real Kubernetes JSON objects
//! (`v1` Pods and Namespaces). The test changes the objects and can drop every connection and
//! refuse new ones (a lost API), then resume on the same port.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use crate::{Node, Pod};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pods,
    Namespaces,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/pods" => Some(Self::Pods),
            "/api/v1/namespaces" => Some(Self::Namespaces),
            _ => None,
        }
    }
    fn list_kind(self) -> &'static str {
        match self {
            Self::Pods => "PodList",
            Self::Namespaces => "NamespaceList",
        }
    }
}

struct Event {
    rv: u64,
    kind: Kind,
    line: String,
}

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    events: Vec<Event>,
    /// Bumped when the test drops the connections: streams of an older epoch end.
    epoch: u64,
    up: bool,
    stop: bool,
    /// Requests served, e.g. `GET /api/v1/pods?watch=true&resourceVersion=3`.
    requests: Vec<String>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct FakeApi {
    shared: Shared,
    pub addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Starts the server on a free port of 127.0.0.1 inside `node`'s netns (where its agent runs).
    pub fn start(node: &Node) -> Result<Self> {
        let ns = File::open(format!("/var/run/netns/{}", node.netns))?;
        let shared: Shared = Arc::new((
            Mutex::new(State {
                up: true,
                rv: 1,
                ..State::default()
            }),
            Condvar::new(),
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            // This thread, and the sockets it creates, live in the node's netns.
            if let Err(e) = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
                let _ = tx.send(Err(anyhow!("setns: {e}")));
                return;
            }
            let listener = match TcpListener::bind("127.0.0.1:0") {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let addr = listener.local_addr();
            let _ = tx.send(addr.map_err(Into::into));
            if let Ok(addr) = listener.local_addr() {
                accept_loop(s, Some(listener), addr);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(5))
            .context("the fake API server did not start")??;
        Ok(Self {
            shared,
            addr,
            thread: Some(thread),
        })
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<PathBuf> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, text)?;
        Ok(path.to_owned())
    }

    fn change(&self, kind: Kind, key: &str, object: Option<Value>) {
        let (lock, cv) = &*self.shared;
        let Ok(mut st) = lock.lock() else { return };
        st.rv += 1;
        let rv = st.rv;
        let map = match kind {
            Kind::Pods => &mut st.pods,
            Kind::Namespaces => &mut st.namespaces,
        };
        let (ty, obj) = match object {
            Some(mut o) => {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                let ty = if map.contains_key(key) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                map.insert(key.to_owned(), o.clone());
                (ty, o)
            }
            None => match map.remove(key) {
                Some(mut o) => {
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    ("DELETED", o)
                }
                None => return,
            },
        };
        let line = json!({"type": ty, "object": obj}).to_string();
        st.events.push(Event { rv, kind, line });
        cv.notify_all();
    }

    /// Adds or replaces a Namespace with these labels.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let obj = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels_json(name, labels)},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        });
        self.change(Kind::Namespaces, name, Some(obj));
    }

    /// Adds or replaces a Pod object.
    pub fn put_pod(&self, pod: Value) {
        let key = format!(
            "{}/{}",
            pod["metadata"]["namespace"].as_str().unwrap_or(""),
            pod["metadata"]["name"].as_str().unwrap_or("")
        );
        self.change(Kind::Pods, &key, Some(pod));
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.change(Kind::Pods, &format!("{namespace}/{name}"), None);
    }

    /// Drops every connection and refuses new ones (the listener is closed) until [`Self::resume`].
    pub fn go_down(&self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.up = false;
            st.epoch += 1;
        }
        cv.notify_all();
    }

    pub fn resume(&self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.up = true;
        }
        cv.notify_all();
    }

    /// The requests served so far (method, path and query).
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .0
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.stop = true;
            st.epoch += 1;
        }
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn labels_json(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("kubernetes.io/metadata.name".into(), json!(name));
    for (k, v) in labels {
        m.insert((*k).into(), json!(v));
    }
    Value::Object(m)
}

/// A real `v1` Pod object for a test-world pod: scheduled on its node, Running, with its IPs, the
/// given uid, labels and QoS class.
pub fn pod_object(
    pod: &Pod,
    uid: &str,
    labels: &[(&str, &str)],
    qos: &str,
    host_network: bool,
) -> Value {
    let mut l = serde_json::Map::new();
    for (k, v) in labels {
        l.insert((*k).into(), json!(v));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": uid,
            "labels": l,
            "creationTimestamp": "2026-01-01T00:00:00Z"
        },
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": pod.service_account,
            "hostNetwork": host_network,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
            "restartPolicy": "Always"
        },
        "status": {
            "phase": "Running",
            "qosClass": qos,
            "podIP": pod.ip4.to_string(),
            "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}],
            "hostIP": "198.19.0.1"
        }
    })
}

fn accept_loop(shared: Shared, mut listener: Option<TcpListener>, addr: SocketAddr) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let (stop, up) = match shared.0.lock() {
            Ok(s) => (s.stop, s.up),
            Err(_) => break,
        };
        if stop {
            break;
        }
        match (up, listener.is_some()) {
            // Down: closing the listener makes new connects fail with "connection refused".
            (false, true) => listener = None,
            (true, false) => {
                listener = TcpListener::bind(addr).ok();
            }
            _ => {}
        }
        let Some(l) = &listener else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = l.set_nonblocking(true);
        match l.accept() {
            Ok((stream, _)) => {
                let s = shared.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = serve_conn(s, stream);
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
        conns.retain(|c| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_conn(shared: Shared, stream: TcpStream) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let epoch = shared.0.lock().map(|s| s.epoch).unwrap_or(0);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        // One request per iteration (the client keeps the connection alive between lists).
        let mut request_line = String::new();
        loop {
            if shared.0.lock().map(|s| s.epoch != epoch).unwrap_or(true) {
                let _ = out.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            match reader.read_line(&mut request_line) {
                Ok(0) => return Ok(()),
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Headers: nothing in them matters here (no body on GET).
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) => return Ok(()),
                Ok(_) if h.trim().is_empty() => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        if let Ok(mut s) = shared.0.lock() {
            s.requests.push(format!(
                "{} {target}",
                request_line.split_whitespace().next().unwrap_or("")
            ));
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_owned())
        };
        if path == "/version" {
            let body = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                              "gitCommit": "0000000000000000000000000000000000000000",
                              "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                              "goVersion": "go1.24.0", "compiler": "gc", "platform": "linux/amd64"})
            .to_string();
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        }
        let Some(kind) = Kind::from_path(path) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": "NotFound", "code": 404, "message": "not served here"})
            .to_string();
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        };
        let watching = matches!(param("watch").as_deref(), Some("true" | "1"));
        if !watching {
            let body = {
                let st = shared.0.lock().map_err(|_| anyhow!("poisoned"))?;
                let items: Vec<&Value> = match kind {
                    Kind::Pods => st.pods.values().collect(),
                    Kind::Namespaces => st.namespaces.values().collect(),
                };
                json!({"kind": kind.list_kind(), "apiVersion": "v1",
                       "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
                .to_string()
            };
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        }
        let mut from: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        out.flush()?;
        // Stream events after `from` until the connection is dropped.
        loop {
            let (lines, ended) = {
                let (lock, cv) = &*shared;
                let st = lock.lock().map_err(|_| anyhow!("poisoned"))?;
                let (st, _) = cv
                    .wait_timeout(st, Duration::from_millis(200))
                    .map_err(|_| anyhow!("poisoned"))?;
                let lines: Vec<(u64, String)> = st
                    .events
                    .iter()
                    .filter(|e| e.kind == kind && e.rv > from)
                    .map(|e| (e.rv, e.line.clone()))
                    .collect();
                (lines, st.epoch != epoch)
            };
            if ended {
                // No terminating chunk: to the client this is a connection lost mid-stream.
                let _ = out.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            for (rv, line) in lines {
                let chunk = format!("{line}\n");
                write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
                from = rv;
            }
            out.flush()?;
        }
    }
}
