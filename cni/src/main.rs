//! `ferry-cni`: a chained CNI plugin (after the cluster's network plugin). On ADD it asks the node's
//! agent to enroll a meshed pod's netns and cgroup before the pod's containers start, and passes the
//! previous plugin's result through unchanged; DEL un-enrolls; CHECK answers whether a pod that must
//! be meshed is enrolled. The runtime calls it with the CNI protocol: `CNI_*` environment variables
//! and the network config on stdin; the result or an error goes to stdout as JSON.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use ferry_cni::{DEFAULT_SOCKET, PodRef, Reply, Request};
use serde::Deserialize;

mod install;

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Connecting to the agent's socket: it is local, so anything slower means no agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Enrolling waits for the agent to set up capture; the kubelet's own CNI timeout is minutes.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// CNI error codes (spec 1.0): 4 invalid environment variables, 6 failure to decode content,
/// 7 invalid network config, 11 try again later.
#[derive(Debug, thiserror::Error)]
enum CniError {
    #[error("{0}")]
    Env(String),
    #[error("{0}")]
    Decode(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Agent(String),
}

impl CniError {
    fn code(&self) -> u32 {
        match self {
            CniError::Env(_) => 4,
            CniError::Decode(_) => 6,
            CniError::Config(_) => 7,
            CniError::Agent(_) => 11,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<serde_json::Value>,
    /// The agent's CNI socket (default `/run/ferry/cni.sock`).
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    /// Pods of these namespaces are never meshed and need no agent: the agent's own pod and the
    /// cluster's system pods must start while no agent runs on the node.
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into(), "ferry-system".into()]
}

fn main() {
    // Run by the DaemonSet's installer container, not by a runtime.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") {
        if let Err(e) = install::run(&args[1..]) {
            eprintln!("ferry-cni install: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.first().map(String::as_str) == Some("uninstall") {
        if let Err(e) = install::run_uninstall(&args[1..]) {
            eprintln!("ferry-cni uninstall: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.first().map(String::as_str) == Some("--version") {
        println!("ferry-cni {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let version = std::env::var("CNI_COMMAND").ok();
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let conf: Option<NetConf> = serde_json::from_str(&stdin).ok();
    let cni_version = conf
        .as_ref()
        .map(|c| c.cni_version.clone())
        .unwrap_or_else(|| "1.0.0".into());
    let result = match read {
        Ok(_) => run(version.as_deref(), &stdin),
        Err(e) => Err(CniError::Decode(format!("reading the network config: {e}"))),
    };
    match result {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            let err = serde_json::json!({
                "cniVersion": cni_version,
                "code": e.code(),
                "msg": e.to_string(),
            });
            println!("{err}");
            eprintln!("ferry-cni: {e}");
            std::process::exit(1);
        }
    }
}

fn run(command: Option<&str>, stdin: &str) -> Result<Option<String>, CniError> {
    let command = command.ok_or_else(|| CniError::Env("CNI_COMMAND is not set".into()))?;
    if command == "VERSION" {
        let v = serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED});
        return Ok(Some(v.to_string()));
    }
    let conf: NetConf = serde_json::from_str(stdin)
        .map_err(|e| CniError::Decode(format!("the network config on stdin: {e}")))?;
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let pod = pod_ref()?;
    match command {
        "ADD" => {
            let prev = conf.prev_result.clone().ok_or_else(|| {
                CniError::Config(
                    "no prevResult: ferry-cni is chained after the cluster's network plugin".into(),
                )
            })?;
            let output = prev.to_string();
            let Some(pod) = pod else {
                return Ok(Some(output));
            };
            if conf.exclude_namespaces.contains(&pod.namespace) {
                return Ok(Some(output));
            }
            let netns = env("CNI_NETNS")?;
            let ips = result_ips(&prev)?;
            let reply = ask(&socket, &Request::Add { pod, netns, ips })?;
            if !reply.ok {
                return Err(CniError::Agent(reply.error.unwrap_or_default()));
            }
            Ok(Some(output))
        }
        "DEL" => {
            let Some(pod) = pod else { return Ok(None) };
            if conf.exclude_namespaces.contains(&pod.namespace) {
                return Ok(None);
            }
            // DEL must succeed when there is nothing left to do: without an agent, the next agent
            // reconciles from the API and un-enrolls pods that are gone.
            match ask(&socket, &Request::Del { pod }) {
                Ok(r) if !r.ok => Err(CniError::Agent(r.error.unwrap_or_default())),
                Ok(_) => Ok(None),
                Err(e) => {
                    eprintln!("ferry-cni: DEL without an agent: {e}");
                    Ok(None)
                }
            }
        }
        "CHECK" => {
            if conf.prev_result.is_none() {
                return Err(CniError::Config("CHECK without prevResult".into()));
            }
            let Some(pod) = pod else { return Ok(None) };
            if conf.exclude_namespaces.contains(&pod.namespace) {
                return Ok(None);
            }
            let reply = ask(&socket, &Request::Check { pod })?;
            if !reply.ok {
                return Err(CniError::Agent(reply.error.unwrap_or_default()));
            }
            Ok(None)
        }
        // Garbage collection and status: the agent reconciles on its own; nothing is held here.
        "GC" | "STATUS" => Ok(None),
        other => Err(CniError::Env(format!("unknown CNI_COMMAND {other:?}"))),
    }
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::Env(format!("{name} is not set")))
}

/// The pod from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`); `None` for a
/// sandbox that is not a Kubernetes pod.
fn pod_ref() -> Result<Option<PodRef>, CniError> {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let get = |key: &str| {
        args.split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
            .filter(|v| !v.is_empty())
    };
    let (Some(namespace), Some(name)) = (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME")) else {
        return Ok(None);
    };
    Ok(Some(PodRef {
        namespace,
        name,
        uid: get("K8S_POD_UID"),
        container_id: env("CNI_CONTAINERID")?,
    }))
}

/// The addresses of a CNI result (`ips[].address`, CIDR notation); 0.3.x and 1.0 results alike.
fn result_ips(prev: &serde_json::Value) -> Result<Vec<IpAddr>, CniError> {
    let ips = prev
        .get("ips")
        .and_then(|v| v.as_array())
        .ok_or_else(|| CniError::Config("prevResult has no ips".into()))?;
    ips.iter()
        .map(|ip| {
            let addr = ip.get("address").and_then(|a| a.as_str()).unwrap_or("");
            addr.split('/').next().unwrap_or("").parse().map_err(|_| {
                CniError::Config(format!("prevResult address {addr:?} is not an IP/prefix"))
            })
        })
        .collect()
}

fn ask(socket: &std::path::Path, req: &Request) -> Result<Reply, CniError> {
    let unreachable = |e: std::io::Error| {
        CniError::Agent(format!(
            "the Ferry agent at {} is not reachable ({e}); the pod must be meshed or checked, so \
             its network setup fails until the agent runs",
            socket.display()
        ))
    };
    let stream = connect(socket, CONNECT_TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).map_err(|e| CniError::Decode(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    serde_json::from_str(reply.trim()).map_err(|e| {
        CniError::Agent(format!(
            "the agent's reply {:?} is not understood: {e}",
            reply.trim()
        ))
    })
}

/// `UnixStream::connect` cannot time out; a local socket either accepts at once or has no listener,
/// but a wedged agent with a full backlog would block the runtime, so connect on a thread.
fn connect(path: &std::path::Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(path));
    });
    rx.recv_timeout(timeout)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}
