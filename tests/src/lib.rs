//! Ferry's test world: "nodes" and "pods" made of network namespaces, veth pairs, bridges and cgroup v2
//! directories on the real kernel, with real agents running in them.
//!
//! - A fabric netns holds a bridge joining the nodes; node `i` has `198.19.0.i` on it and routes every
//!   other node's pod subnet through that node.
//! - A node is a netns with a bridge `br0` (pod gateway `198.18.s.1`, `2001:db8:s::1`, where `s` is the
//!   node's pod subnet), a cgroup root for its pods and a bpffs root for its agent's pinned state.
//! - A pod is a netns whose `eth0` is a veth into its node's bridge, with a default route to the node
//!   and nothing else: a connect that escapes capture fails instead of leaving the test world. Its
//!   processes run in a "container" child cgroup of the pod cgroup, as container runtimes do.
//!
//! Every name carries the creating process id and a random suffix. Everything is removed on drop (also
//! while unwinding from a panic), and [`sweep_stale`] removes what a killed test run left behind.
use std::{
    ffi::{CString, OsStr},
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod kube_api;

pub const CGROUP2: &str = "/sys/fs/cgroup/unified";
pub const BPFFS: &str = "/sys/fs/bpf";
/// How every test world names its netns, cgroups, pins and temp directory (then its pid and a tag).
pub const PREFIX: &str = "ferry-t";
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(netns: &str, args: &str) -> Result<()> {
    let mut v = vec!["ip", "-n", netns];
    v.extend(args.split_whitespace());
    sh(&v).map(drop)
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    sh(&[
        "ip",
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
    .map(drop)
}

/// A binary of this workspace: `$<env>`, or `<name>` in the target directory of the running binary
/// (`target/<profile>/deps/<test>` or `target/<profile>/<bin>`).
fn workspace_bin(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let candidate = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|p| p.exists());
    match candidate {
        Some(p) => p,
        None => panic!(
            "{name} not found beside {}: build it first (`cargo build --workspace --bins`) or set {env}",
            exe.display()
        ),
    }
}

/// The chained CNI plugin under test.
pub fn ferry_cni_bin() -> PathBuf {
    workspace_bin("FERRY_CNI", "ferry-cni")
}

/// The agent binary under test.
pub fn ferry_bin() -> PathBuf {
    workspace_bin("FERRY_BIN", "ferry")
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "Ferry's end-to-end tests need root (network namespaces, cgroups, eBPF): run them as root"
    );
}

fn ensure_bpffs() -> Result<()> {
    let st = nix::sys::statfs::statfs(BPFFS).context("statfs /sys/fs/bpf")?;
    if st.filesystem_type().0 as i64 != 0xcafe_4a11 {
        sh(&["mount", "-t", "bpf", "bpf", BPFFS])?;
    }
    Ok(())
}

/// Removes namespaces, cgroups and pinned state left by test worlds whose process is gone.
pub fn sweep_stale() {
    let alive = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return true;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        match pid.parse::<i32>() {
            Ok(pid) => Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => true,
        }
    };
    if let Ok(list) = sh(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(PREFIX) && !alive(name) {
                kill_netns_procs(name);
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    }
    let tmp = std::env::temp_dir();
    for base in [CGROUP2, BPFFS, tmp.to_str().unwrap_or("/tmp")] {
        let Ok(entries) = fs::read_dir(base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !alive(&name) {
                if base == CGROUP2 {
                    remove_cgroup_tree(&e.path());
                } else {
                    // bpffs pins, or the logs a failed run kept in the temp dir.
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

fn kill_netns_procs(netns: &str) {
    if let Ok(pids) = sh(&["ip", "netns", "pids", netns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
}

/// Kills what runs in a cgroup tree and removes it, leaves first.
fn remove_cgroup_tree(path: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    for d in &dirs {
        let _ = fs::write(d.join("cgroup.kill"), "1");
    }
    for d in dirs.iter().rev() {
        for _ in 0..100 {
            if fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub subnet: u8,
    pub fabric_ip: Option<Ipv4Addr>,
    pub cgroup_root: PathBuf,
    pub bpffs_root: PathBuf,
    pub dir: PathBuf,
}

/// The sum of Prometheus metric `name`'s series (text format) whose labels include every
/// `(key, value)` of `want`.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

impl Node {
    pub fn gateway4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }
    pub fn gateway6(&self) -> Ipv6Addr {
        format!("2001:db8:{}::1", self.subnet)
            .parse()
            .unwrap_or(Ipv6Addr::UNSPECIFIED)
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("node.yaml")
    }
    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }
    pub fn policies_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }
    /// Writes (or replaces) one policy file, atomically.
    pub fn write_policy(&self, file: &str, yaml: &str) -> Result<()> {
        let dir = self.policies_dir();
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(tmp, dir.join(file))?;
        Ok(())
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
    /// Runs a `ferry` CLI command against this node's agent and parses its `-o json` answer.
    pub fn cli(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = Command::new(ferry_bin())
            .args(args)
            .arg("--socket")
            .arg(self.admin_socket())
            .args(["-o", "json"])
            .output()?;
        if !out.status.success() {
            bail!(
                "ferry {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
    /// The sum of metric `name`'s series whose labels include every `(key, value)` of `want`, from
    /// the agent's `/metrics` (0 when none: a counter vector has no series before its first event).
    pub fn metric(&self, name: &str, want: &[(&str, &str)]) -> Result<f64> {
        let (status, text) = self.http_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(metric_sum(&text, name, want))
    }
    /// `GET path` from the agent's admin HTTP server (127.0.0.1:15020 in the node's netns).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let ns = File::open(format!("/var/run/netns/{}", self.netns))?;
        let path = path.to_owned();
        std::thread::spawn(move || -> Result<(u16, String)> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut s = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:15020".parse()?,
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let status = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Ok((status, body))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("http_get thread panicked"))?
    }
    /// A command that runs in the node's netns (and the test's own cgroup, outside every pod).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(Command::new(program), &self.netns, None)
    }
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The "container" cgroup below the pod's, where its processes run.
    pub app_cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.netns)
    }
    /// A command that runs as one of the pod's containers: in its netns and its container cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(Command::new(program), &self.netns, Some(&self.app_cgroup))
    }
    /// A command in the pod's netns but in a cgroup of its own, outside the pod's cgroup.
    pub fn command_outside_cgroup(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: &Path,
    ) -> Command {
        in_netns(Command::new(program), &self.netns, Some(cgroup))
    }
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Makes `cmd` join `cgroup` (if any) and then the netns, in the child before exec. The cgroup comes
/// first: `ip netns exec` would remount /sys and hide the cgroup tree.
fn in_netns(mut cmd: Command, netns: &str, cgroup: Option<&Path>) -> Command {
    let ns_path = CString::new(format!("/var/run/netns/{netns}")).unwrap_or_default();
    let procs = cgroup.map(|c| {
        CString::new(c.join("cgroup.procs").to_string_lossy().as_bytes()).unwrap_or_default()
    });
    // SAFETY: only async-signal-safe calls (open, write, setns, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Writing 0 moves the writing process itself.
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let fd = libc::open(ns_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            libc::close(fd);
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Knobs of a node's config file.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// How long in-flight connections may finish after SIGTERM (default 5s).
    pub drain_deadline: Option<&'static str>,
    /// Lifetime of workload certificates (default 24h).
    pub workload_ttl: Option<&'static str>,
    pub inbound: Option<&'static str>,
    pub outbound_unknown: Option<&'static str>,
    /// A `kubernetes:` section (flow YAML) instead of the workloads file.
    pub kubernetes: Option<String>,
    pub extra: String,
}

pub struct World {
    pub id: String,
    pub dir: PathBuf,
    cgroup_base: PathBuf,
    bpffs_base: PathBuf,
    fabric: String,
    netns: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
}

impl World {
    pub fn new() -> Result<Self> {
        require_root();
        sweep_stale();
        ensure_bpffs()?;
        let id = format!(
            "{PREFIX}{}x{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir)?;
        let cgroup_base = Path::new(CGROUP2).join(&id);
        fs::create_dir_all(&cgroup_base).context("creating the test world's cgroup")?;
        let bpffs_base = Path::new(BPFFS).join(&id);
        fs::create_dir_all(&bpffs_base).context("creating the test world's bpffs directory")?;
        let fabric = format!("{id}-fab");
        let world = Self {
            id,
            dir,
            cgroup_base,
            bpffs_base,
            fabric: fabric.clone(),
            netns: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            nodes: Vec::new(),
            pods: Vec::new(),
        };
        world.add_netns(&fabric)?;
        world.ferry(
            &["ca", "init", "--trust-domain", TRUST_DOMAIN, "--out"],
            &world.ca_dir(),
        )?;
        ip(&fabric, "link add br0 type bridge")?;
        ip(&fabric, "link set br0 up")?;
        Ok(world)
    }

    /// The trust domain's root CA of this world.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Runs `ferry <args> <path>` to completion.
    pub fn ferry(&self, args: &[&str], path: &Path) -> Result<String> {
        let out = Command::new(ferry_bin()).args(args).arg(path).output()?;
        if !out.status.success() {
            bail!(
                "ferry {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Mints a certificate and key for `identity` from `node`'s intermediate, for a non-Ferry peer;
    /// returns the directory holding `cert.pem`, `key.pem` (and the node's `bundle.pem` beside).
    pub fn issue_workload(&self, node: &Node, identity: &str, label: &str) -> Result<PathBuf> {
        let out = self.dir.join(label);
        let node_dir = node.dir.join("certs");
        self.ferry(
            &[
                "ca",
                "issue-workload",
                "--identity",
                identity,
                "--node-dir",
                &node_dir.to_string_lossy(),
                "--out",
            ],
            &out,
        )?;
        fs::copy(node_dir.join("bundle.pem"), out.join("bundle.pem"))?;
        Ok(out)
    }

    fn add_netns(&self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", name])?;
        if let Ok(mut v) = self.netns.lock() {
            v.push(name.to_owned());
        }
        ip(name, "link set lo up")
    }

    /// Adds a node whose pods use subnet `198.18.<subnet>.0/24` and `2001:db8:<subnet>::/64`. With
    /// `routed`, the node joins the fabric and every routed node reaches every other's pods.
    pub fn add_node(&mut self, name: &str, subnet: u8, routed: bool) -> Result<Node> {
        let netns = format!("{}-{name}", self.id);
        self.add_netns(&netns)?;
        ip(&netns, "link add br0 type bridge")?;
        ip(&netns, "link set br0 up")?;
        ip(&netns, &format!("addr add 198.18.{subnet}.1/24 dev br0"))?;
        ip(
            &netns,
            &format!("addr add 2001:db8:{subnet}::1/64 dev br0 nodad"),
        )?;
        sysctl(&netns, "net.ipv4.ip_forward", "1")?;
        sysctl(&netns, "net.ipv6.conf.all.forwarding", "1")?;
        let index = self.nodes.len() as u8 + 1;
        let fabric_ip = if routed {
            let fab = Ipv4Addr::new(198, 19, 0, index);
            ip(
                &netns,
                &format!(
                    "link add fab0 type veth peer name n{index} netns {}",
                    self.fabric
                ),
            )?;
            ip(&self.fabric, &format!("link set n{index} master br0 up"))?;
            ip(&netns, "link set fab0 up")?;
            ip(&netns, &format!("addr add {fab}/24 dev fab0"))?;
            ip(
                &netns,
                &format!("addr add 2001:db8:ff::{index}/64 dev fab0 nodad"),
            )?;
            for other in self.nodes.iter().filter(|n| n.fabric_ip.is_some()) {
                let oi = other.fabric_ip.map(|a| a.octets()[3]).unwrap_or(0);
                let os = other.subnet;
                ip(
                    &netns,
                    &format!("route add 198.18.{os}.0/24 via 198.19.0.{oi}"),
                )?;
                ip(
                    &netns,
                    &format!("-6 route add 2001:db8:{os}::/64 via 2001:db8:ff::{oi}"),
                )?;
                ip(
                    &other.netns,
                    &format!("route add 198.18.{subnet}.0/24 via {fab}"),
                )?;
                ip(
                    &other.netns,
                    &format!("-6 route add 2001:db8:{subnet}::/64 via 2001:db8:ff::{index}"),
                )?;
            }
            Some(fab)
        } else {
            None
        };
        let cgroup_root = self.cgroup_base.join(name);
        fs::create_dir_all(&cgroup_root)?;
        let dir = self.dir.join(name);
        fs::create_dir_all(dir.join("policies"))?;
        self.ferry(
            &[
                "ca",
                "issue-node",
                "--ca",
                &self.ca_dir().to_string_lossy(),
                "--node",
                name,
                "--out",
            ],
            &dir.join("certs"),
        )?;
        let node = Node {
            name: name.to_owned(),
            netns,
            subnet,
            fabric_ip,
            cgroup_root,
            bpffs_root: self.bpffs_base.join(name),
            dir,
        };
        self.nodes.push(node.clone());
        self.write_config(&node, &NodeOptions::default())?;
        Ok(node)
    }

    /// Adds a pod `host` on `node`'s subnet, in namespace `default` with service account `default`.
    pub fn add_pod(&mut self, node: &Node, name: &str, host: u8) -> Result<Pod> {
        self.add_pod_as(node, name, host, "default", "default")
    }

    pub fn add_pod_as(
        &mut self,
        node: &Node,
        name: &str,
        host: u8,
        namespace: &str,
        sa: &str,
    ) -> Result<Pod> {
        let cgroup = node.cgroup_root.join(format!("pod-{name}"));
        self.add_pod_in(node, name, host, namespace, sa, cgroup)
    }

    /// A pod whose cgroup is `cgroup` (below the node's cgroup root), e.g. where the kubelet would put
    /// it.
    pub fn add_pod_in(
        &mut self,
        node: &Node,
        name: &str,
        host: u8,
        namespace: &str,
        sa: &str,
        cgroup: PathBuf,
    ) -> Result<Pod> {
        let netns = format!("{}-{}-{name}", self.id, node.name);
        self.add_netns(&netns)?;
        let host_if = format!("p{}", self.pods.len());
        ip(
            &node.netns,
            &format!("link add {host_if} type veth peer name eth0 netns {netns}"),
        )?;
        ip(&node.netns, &format!("link set {host_if} master br0 up"))?;
        let s = node.subnet;
        ip(&netns, "link set eth0 up")?;
        ip(&netns, &format!("addr add 198.18.{s}.{host}/24 dev eth0"))?;
        ip(
            &netns,
            &format!("addr add 2001:db8:{s}::{host}/64 dev eth0 nodad"),
        )?;
        ip(&netns, &format!("route add default via 198.18.{s}.1"))?;
        ip(&netns, &format!("-6 route add default via 2001:db8:{s}::1"))?;
        let app_cgroup = cgroup.join("app");
        fs::create_dir_all(&app_cgroup)?;
        let pod = Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: sa.to_owned(),
            node: node.name.clone(),
            netns,
            cgroup,
            app_cgroup,
            ip4: Ipv4Addr::new(198, 18, s, host),
            ip6: format!("2001:db8:{s}::{host}").parse()?,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// An empty netns (only `lo` up) on `node` for a pod whose network a CNI plugin sets up; removed
    /// with the world. Returns its name (under `/var/run/netns`).
    pub fn add_pod_netns(&self, node: &Node, name: &str) -> Result<String> {
        let netns = format!("{}-{}-{name}", self.id, node.name);
        self.add_netns(&netns)?;
        Ok(netns)
    }

    /// A cgroup below `node`'s cgroup root that is not a pod's.
    pub fn unenrolled_cgroup(&self, node: &Node, name: &str) -> Result<PathBuf> {
        let p = node.cgroup_root.join(name);
        fs::create_dir_all(&p)?;
        Ok(p)
    }

    pub fn write_config(&self, node: &Node, opts: &NodeOptions) -> Result<()> {
        let text = format!(
            "node: {}\npolicies: policies\nadmin: {{socket: admin.sock}}\nhandoff_socket: handoff.sock\ndrain_deadline: {}\ntrust_domain: {TRUST_DOMAIN}\ncertificates: {{dir: certs, workload_ttl: {}}}\nbpffs_root: {}\ncgroup_root: {}\n{}\ninbound: {}\noutbound_unknown: {}\n{}",
            node.name,
            opts.drain_deadline.unwrap_or("5s"),
            opts.workload_ttl.unwrap_or("24h"),
            node.bpffs_root.display(),
            node.cgroup_root.display(),
            match &opts.kubernetes {
                Some(k) => format!("kubernetes: {k}"),
                None => "workloads: workloads.yaml".into(),
            },
            opts.inbound.unwrap_or("permissive"),
            opts.outbound_unknown.unwrap_or("passthrough"),
            opts.extra,
        );
        fs::write(node.config_path(), text)?;
        if !node.workloads_path().exists() {
            fs::write(node.workloads_path(), "workloads: []\n")?;
        }
        Ok(())
    }

    /// Writes `node`'s workloads file listing `pods` (pods of every node: the agent needs them all).
    pub fn write_workloads(&self, node: &Node, pods: &[&Pod]) -> Result<()> {
        let mut text = String::from("workloads:\n");
        for p in pods {
            text.push_str(&format!(
                "  - name: {}\n    namespace: {}\n    service_account: {}\n    node: {}\n    ips: [{}, {}]\n",
                p.name, p.namespace, p.service_account, p.node, p.ip4, p.ip6
            ));
            if p.node == node.name {
                text.push_str(&format!(
                    "    netns: {}\n    cgroup: {}\n",
                    p.netns_path().display(),
                    p.cgroup.display()
                ));
            }
        }
        // Written whole and renamed, as a config management tool would.
        let tmp = node.dir.join(".workloads.tmp");
        fs::write(&tmp, text)?;
        fs::rename(tmp, node.workloads_path())?;
        Ok(())
    }

    /// Starts the node's agent and waits until it reports ready.
    pub fn start_agent(&self, node: &Node) -> Result<Agent> {
        self.start_agent_with(node, &node.config_path(), &[])
    }

    /// Starts an agent of `node` with another config file (e.g. a second agent beside a running one)
    /// and waits until it reports ready.
    pub fn start_agent_with(&self, node: &Node, config: &Path, args: &[&OsStr]) -> Result<Agent> {
        let agent = self.spawn_agent(node, config, args)?;
        agent.wait_for(|l| l.msg() == "ready", Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts an agent of `node` (`ferry run --config <config> <args>`) without waiting for it.
    pub fn spawn_agent(&self, node: &Node, config: &Path, args: &[&OsStr]) -> Result<Agent> {
        let log_path = unique(node.dir.join("agent.log"));
        let log = File::create(&log_path)?;
        let mut cmd = node.command(ferry_bin());
        cmd.args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .args(args)
            // FERRY_TEST_AGENT_LOG (a FERRY_LOG filter) looks deeper into the agents of a test run.
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting the agent")?;
        let pid = child.id();
        self.track(child);
        Ok(Agent {
            pid,
            log_path,
            node: node.name.clone(),
        })
    }

    /// Starts a long-running process and keeps it for cleanup; its stdout goes to a file.
    pub fn spawn(&self, mut cmd: Command, label: &str) -> Result<Proc> {
        let out = unique(self.dir.join(format!("{label}.out")));
        let f = File::create(&out)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        let pid = child.id();
        self.track(child);
        Ok(Proc { pid, out })
    }

    /// Starts `ferry-testapp serve` in `ctx` (a pod's or node's command) and waits until it listens.
    pub fn serve(&self, mut ctx: Command, listen: &str, tag: &str) -> Result<Proc> {
        ctx.args(["serve", "--listen", listen, "--tag", tag]);
        let p = self.spawn(ctx, tag)?;
        p.wait_for_output("listening", Duration::from_secs(5))?;
        Ok(p)
    }

    /// Starts `ferry-testapp hold` (a long-lived echo exchange) in `ctx` and waits until connected.
    pub fn hold(&self, ctx: Command, to: SocketAddr, seconds: u32) -> Result<Proc> {
        self.hold_pausing(ctx, to, seconds, 50)
    }

    /// As [`World::hold`], pausing `pause_ms` between exchanges (0: back to back).
    pub fn hold_pausing(
        &self,
        mut ctx: Command,
        to: SocketAddr,
        seconds: u32,
        pause_ms: u64,
    ) -> Result<Proc> {
        ctx.args([
            "hold",
            "--to",
            &to.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--pause-ms",
            &pause_ms.to_string(),
        ]);
        let p = self.spawn(ctx, "hold")?;
        p.wait_for_output("connected", Duration::from_secs(5))?;
        Ok(p)
    }

    fn track(&self, child: Child) {
        if let Ok(mut c) = self.children.lock() {
            c.push(child);
        }
    }
}

fn unique(path: PathBuf) -> PathBuf {
    if !path.exists() {
        return path;
    }
    for i in 1.. {
        let p = path.with_extension(format!("{i}.log"));
        if !p.exists() {
            return p;
        }
    }
    path
}

impl Drop for World {
    fn drop(&mut self) {
        if let Ok(mut children) = self.children.lock() {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Ok(names) = self.netns.lock() {
            for n in names.iter().rev() {
                kill_netns_procs(n);
                let _ = sh(&["ip", "netns", "del", n]);
            }
        }
        remove_cgroup_tree(&self.cgroup_base);
        // Pinned links and maps: unlinking the pins detaches what no process holds any more.
        let _ = fs::remove_dir_all(&self.bpffs_base);
        if std::env::var_os("FERRY_KEEP_LOGS").is_none() && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test world logs kept in {}", self.dir.display());
        }
    }
}

/// A policy (`shop/deny-frontend`) that denies every source in namespace `shop`: the tests' way to
/// turn allowed connections into denied ones with a reload.
pub const DENY_SHOP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-frontend, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [shop]}}]\n";

/// The most common world: node n1 with a client pod (shop/frontend, 198.18.1.10) and node n2 with a
/// server pod (shop/cart, 198.18.2.20), both in both nodes' workloads, both agents running with
/// their pod enrolled.
pub struct TwoNodes {
    pub world: World,
    pub n1: Node,
    pub n2: Node,
    pub client: Pod,
    pub server: Pod,
    pub a1: Agent,
    pub a2: Agent,
}

impl TwoNodes {
    /// Starts the world with `o1` and `o2` as the nodes' config options.
    pub fn start(o1: &NodeOptions, o2: &NodeOptions) -> Result<Self> {
        let mut world = World::new()?;
        let n1 = world.add_node("n1", 1, true)?;
        let n2 = world.add_node("n2", 2, true)?;
        world.write_config(&n1, o1)?;
        world.write_config(&n2, o2)?;
        let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
        let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
        for n in [&n1, &n2] {
            world.write_workloads(n, &[&client, &server])?;
        }
        let a1 = world.start_agent(&n1)?;
        let a2 = world.start_agent(&n2)?;
        for a in [&a1, &a2] {
            a.wait_for(|l| l.msg() == "pod enrolled", Duration::from_secs(5))?;
        }
        Ok(Self {
            world,
            n1,
            n2,
            client,
            server,
            a1,
            a2,
        })
    }
}

/// The policy tests' world before any agent starts: node n1 with a client pod (shop/frontend) and an
/// intruder pod (lab/default), node n2 with a server pod (shop/cart) labelled `app: cart`, all three
/// in both nodes' workloads.
pub struct ShopAndLab {
    pub world: World,
    pub n1: Node,
    pub n2: Node,
    pub client: Pod,
    pub intruder: Pod,
    pub server: Pod,
}

impl ShopAndLab {
    pub fn new() -> Result<Self> {
        let mut world = World::new()?;
        let n1 = world.add_node("n1", 1, true)?;
        let n2 = world.add_node("n2", 2, true)?;
        let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
        let intruder = world.add_pod_as(&n1, "intruder", 11, "lab", "default")?;
        let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
        for n in [&n1, &n2] {
            world.write_workloads(n, &[&client, &intruder, &server])?;
        }
        // The label a policy's selector picks the server by.
        let text = fs::read_to_string(n2.workloads_path())?;
        let labelled = text.replace(
            "  - name: server\n",
            "  - name: server\n    labels: {app: cart}\n",
        );
        if labelled == text {
            bail!("the workloads file no longer has the server entry this fixture labels");
        }
        fs::write(n2.workloads_path(), labelled)?;
        Ok(Self {
            world,
            n1,
            n2,
            client,
            intruder,
            server,
        })
    }
}

/// A JSON log line of the agent.
pub struct LogLine(pub serde_json::Value);

impl LogLine {
    pub fn msg(&self) -> &str {
        self.0.get("message").and_then(|v| v.as_str()).unwrap_or("")
    }
    pub fn field(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
    pub fn is_access(&self) -> bool {
        self.0.get("target").and_then(|v| v.as_str()) == Some("ferry::access")
    }
}

pub struct Agent {
    pub pid: u32,
    pub log_path: PathBuf,
    pub node: String,
}

impl Agent {
    /// Context switches of all the agent's threads so far: how often it was put to sleep and woken.
    pub fn context_switches(&self) -> Result<u64> {
        let mut total = 0;
        let tasks = format!("/proc/{}/task", self.pid);
        for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
            let status = task?.path().join("status");
            // A thread that ended since the listing has no status left: it switches no more.
            let Ok(text) = std::fs::read_to_string(&status) else {
                continue;
            };
            for line in text.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v
                        .trim()
                        .parse::<u64>()
                        .with_context(|| format!("{status:?}: {line}"))?;
                }
            }
        }
        Ok(total)
    }

    pub fn lines(&self) -> Vec<LogLine> {
        let Ok(f) = File::open(&self.log_path) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok().map(LogLine))
            .collect()
    }

    pub fn access_lines(&self) -> Vec<LogLine> {
        self.lines()
            .into_iter()
            .filter(LogLine::is_access)
            .collect()
    }

    /// Waits until a log line satisfies `pred`; fails with the log if it does not come in time, or if
    /// the agent exits first.
    pub fn wait_for(&self, pred: impl Fn(&LogLine) -> bool, timeout: Duration) -> Result<LogLine> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if !Path::new(&format!("/proc/{}", self.pid)).exists() || Instant::now() > deadline {
                let log = fs::read_to_string(&self.log_path).unwrap_or_default();
                bail!(
                    "agent on {} did not log the expected line; its log:\n{log}",
                    self.node
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Whether the agent process has exited (a zombie counts as exited).
    pub fn exited(&self) -> bool {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status.is_empty() || status.contains("State:\tZ")
    }

    /// SIGTERM, then waits up to `timeout` for the agent to exit; whether it did.
    pub fn terminate(&self, timeout: Duration) -> bool {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::SIGTERM,
        );
        eventually(timeout, || self.exited())
    }

    pub fn kill9(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // A zombie still has /proc/<pid>; its status says so.
            let status =
                fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
            if status.is_empty() || status.contains("State:\tZ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A long-running process of the test world, with its output in a file.
pub struct Proc {
    pub pid: u32,
    pub out: PathBuf,
}

impl Proc {
    pub fn output(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            if Instant::now() > deadline {
                bail!(
                    "process {} did not print {needle:?}; output:\n{}",
                    self.pid,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
    pub fn is_running(&self) -> bool {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        !status.is_empty() && !status.contains("State:\tZ")
    }
}

/// Runs a command to completion with a timeout and returns its stdout.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drained while the child runs: a full pipe would block it forever.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut out);
            }
            out
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("{cmd:?} exited with {status}: {err}{out}");
    }
    Ok(out)
}

/// The test world's app binary.
pub fn testapp() -> PathBuf {
    workspace_bin("FERRY_TESTAPP", "ferry-testapp")
}

/// A second eBPF object, built from `ebpf/` with its `upgrade-test-variant` feature (every capture
/// counter advances by 2) into `<target dir>/ebpf-variant`, for upgrade tests that need an object
/// other than the agent's own. Incremental after the first build (about a minute: nightly with
/// `-Z build-std=core`, as the agent's build script builds the real one).
pub fn ebpf_variant_object() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/<test binary>
    let target = exe
        .ancestors()
        .nth(3)
        .context("the test binary is not in a cargo target directory")?
        .join("ebpf-variant");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent directory")?;
    let tools = std::env::var_os("FERRY_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools"))
        .join("bin");
    let mut path = vec![tools];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let out = Command::new("cargo")
        .current_dir(root.join("ebpf"))
        // The rustup proxy picks the nightly; the stable toolchain's variables would override it.
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("PATH", std::env::join_paths(path)?)
        .args([
            "+nightly",
            "build",
            "--package",
            "ferry-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--features",
            "upgrade-test-variant",
            "--target-dir",
        ])
        .arg(&target)
        .output()
        .context("running cargo +nightly to build the variant eBPF object")?;
    if !out.status.success() {
        bail!(
            "building the variant eBPF object failed (run `cargo xtask setup` first):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(target.join("bpfel-unknown-none/release/ferry-ebpf"))
}

/// The steady-load client (`ferry-load`: long-lived transfers and a stream of new connections).
pub fn load_bin() -> PathBuf {
    workspace_bin("FERRY_LOAD", "ferry-load")
}

/// The result of one `ferry-testapp dial`.
#[derive(Debug, serde::Deserialize)]
pub struct Dial {
    pub ok: bool,
    /// Whether connect() succeeded (a failure may come later, e.g. a reset).
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default, deserialize_with = "opt_addr")]
    pub peer: Option<SocketAddr>,
    #[serde(default, deserialize_with = "opt_addr")]
    pub local: Option<SocketAddr>,
    /// The server's greeting line: `<tag> peer=<addr> local=<addr>`.
    #[serde(default)]
    pub greeting: String,
    #[serde(default)]
    pub echo: String,
}

/// An address, or none when the app could not tell (an empty string).
fn opt_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s: String = serde::Deserialize::deserialize(d)?;
    Ok(s.parse().ok())
}

impl Dial {
    pub fn greeting_field(&self, key: &str) -> Option<String> {
        self.greeting
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
    }
}

/// Runs `ferry-testapp dial` in `cmd`'s context (a pod or a node) and parses its result.
pub fn dial(mut cmd: Command, to: SocketAddr, send: &str) -> Result<Dial> {
    cmd.args([
        "dial",
        "--to",
        &to.to_string(),
        "--send",
        send,
        "--timeout-ms",
        "3000",
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(10))?;
    serde_json::from_str(out.trim()).with_context(|| format!("parsing dial output {out:?}"))
}

/// Polls until `f` returns true or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Captures every frame seen on an interface of a netns (AF_PACKET), until stopped.
pub struct Sniffer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Result<Vec<u8>>>,
}

impl Sniffer {
    /// Starts capturing on `iface` inside `netns`; returns once the socket is bound.
    pub fn start(netns: &str, iface: &str) -> Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns_path, iface, stop2) = (
            format!("/var/run/netns/{netns}"),
            iface.to_owned(),
            stop.clone(),
        );
        let handle = std::thread::spawn(move || -> Result<Vec<u8>> {
            let ns = File::open(&ns_path)?;
            // This thread is the sniffer's own: switching its netns affects nothing else.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let ifname = CString::new(iface.clone())?;
            // SAFETY: plain socket syscalls on descriptors this thread owns.
            unsafe {
                let ifindex = libc::if_nametoindex(ifname.as_ptr());
                if ifindex == 0 {
                    let _ = ready_tx.send(Err(format!("no interface {iface}")));
                    bail!("no interface {iface}");
                }
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                );
                if fd < 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e.into());
                }
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex as i32;
                if libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e.into());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let _ = ready_tx.send(Ok(()));
                let mut all = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        all.extend_from_slice(&buf[..n as usize]);
                    }
                }
                libc::close(fd);
                Ok(all)
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, handle }),
            Ok(Err(e)) => bail!("sniffer on {netns}/{}: {e}", "iface"),
            Err(_) => bail!("sniffer did not start"),
        }
    }

    /// Stops and returns every byte of every frame seen.
    pub fn stop(self) -> Result<Vec<u8>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("sniffer panicked"))?
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Creates and pins a hash map with the given key and value sizes (raw `bpf(2)`), to stand for
/// pinned state left by an agent with another map layout.
pub fn pin_hash_map(path: &Path, key_size: u32, value_size: u32) -> Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _rest: [u8; 108],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u8; 112],
    }
    let create = MapCreate {
        map_type: 1, // BPF_MAP_TYPE_HASH
        key_size,
        value_size,
        max_entries: 1,
        map_flags: 0,
        _rest: [0; 108],
    };
    // SAFETY: attribute structs sized as the kernel's union (zero-padded); the fd is closed below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &create as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    let cpath = CString::new(path.as_os_str().as_encoded_bytes())?;
    let pin = ObjPin {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
        _rest: [0; 112],
    };
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            &pin as *const ObjPin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd as i32) };
    if rc != 0 {
        bail!("BPF_OBJ_PIN {}: {err}", path.display());
    }
    Ok(())
}

/// A pinned BPF map with `u64` keys, opened with raw `bpf(2)` (the test world links no BPF library):
/// lets a test see and change the agent's pinned state behind its back.
pub struct PinnedU64Map(std::os::fd::OwnedFd);

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next: u64,
    flags: u64,
    _rest: [u8; 96],
}

impl PinnedU64Map {
    pub fn open(path: &Path) -> Result<Self> {
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
            _rest: [u8; 112],
        }
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())?;
        let get = ObjGet {
            pathname: cpath.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
            _rest: [0; 112],
        };
        // SAFETY: the attribute is sized as the kernel's union, zero-padded; the path outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                7, // BPF_OBJ_GET
                &get as *const ObjGet,
                std::mem::size_of::<ObjGet>(),
            )
        };
        if fd < 0 {
            bail!(
                "BPF_OBJ_GET {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(Self(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd as i32)
        }))
    }

    fn call(&self, cmd: i64, key: Option<&u64>, out: Option<&mut u64>) -> std::io::Result<()> {
        self.call_raw(cmd, key, out.map_or(0, |o| o as *mut u64 as u64))
    }

    /// `value` is the address of a buffer the size of the map's values, or 0.
    fn call_raw(&self, cmd: i64, key: Option<&u64>, value: u64) -> std::io::Result<()> {
        let attr = MapElem {
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&self.0) as u32,
            _pad: 0,
            key: key.map_or(0, |k| k as *const u64 as u64),
            value_or_next: value,
            flags: 0,
            _rest: [0; 96],
        };
        // SAFETY: the attribute is sized as the kernel's union; key and out point to live u64s.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &attr as *const MapElem,
                std::mem::size_of::<MapElem>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every key in the map.
    pub fn keys(&self) -> Result<Vec<u64>> {
        let mut keys = Vec::new();
        let mut next = 0u64;
        let mut prev: Option<u64> = None;
        loop {
            // BPF_MAP_GET_NEXT_KEY; ENOENT after the last key.
            match self.call(4, prev.as_ref(), Some(&mut next)) {
                Ok(()) => {
                    keys.push(next);
                    prev = Some(next);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => bail!("BPF_MAP_GET_NEXT_KEY: {e}"),
            }
        }
    }

    /// The value under `key`, of type `T` (which must be the map's value type, `#[repr(C)]`).
    pub fn get<T: Copy + Default>(&self, key: u64) -> Result<T> {
        let mut value = T::default();
        // BPF_MAP_LOOKUP_ELEM
        self.call_raw(1, Some(&key), &mut value as *mut T as u64)
            .with_context(|| format!("BPF_MAP_LOOKUP_ELEM {key:#x}"))?;
        Ok(value)
    }

    /// Overwrites the value under `key` (see [`PinnedU64Map::get`]).
    pub fn set<T: Copy>(&self, key: u64, value: &T) -> Result<()> {
        // BPF_MAP_UPDATE_ELEM
        self.call_raw(2, Some(&key), value as *const T as u64)
            .with_context(|| format!("BPF_MAP_UPDATE_ELEM {key:#x}"))
    }

    pub fn delete(&self, key: u64) -> Result<()> {
        // BPF_MAP_DELETE_ELEM
        self.call(3, Some(&key), None)
            .with_context(|| format!("BPF_MAP_DELETE_ELEM {key:#x}"))
    }
}
