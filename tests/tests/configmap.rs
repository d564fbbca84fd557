//! Policies from a Kubernetes ConfigMap volume: the node's policy directory is laid out as the kubelet
//! lays out a ConfigMap mount, then updated with the kubelet's atomic swap, and the running agent
//! enforces the new policy without a restart. The agent also takes its node name from `NODE_NAME`
//! (the DaemonSet's downward API), since one node config ConfigMap serves every node, and an agent
//! leaving during a surge rollout keeps its hands off its successor's admin socket.
use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::symlink,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use ferry_e2e::{Agent, Node, Pod, ShopAndLab, World, dial, ferry_bin, testapp};

/// Only frontend (namespace shop) may reach the cart.
const ALLOW_FRONTEND: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
";

/// The flipped decision: only namespace lab may reach the cart.
const ALLOW_LAB: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [lab]}}]
";

/// A second key of the ConfigMap that selects nothing here; the update drops it.
const PAYMENTS: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: payments}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules: [{}]
";

/// Writes `files` the way the kubelet's atomic writer updates a ConfigMap volume: a new timestamped
/// directory, a `..data_tmp` link to it renamed over `..data` (the one atomic step), user-visible links
/// `<key> -> ..data/<key>` for the keys, links of dropped keys removed, then the old directory removed.
fn kubelet_project(dir: &Path, stamp: &str, files: &[(&str, &str)]) -> Result<()> {
    let ts = format!("..{stamp}");
    std::fs::create_dir(dir.join(&ts)).with_context(|| format!("creating {ts}"))?;
    for (key, text) in files {
        std::fs::write(dir.join(&ts).join(key), text)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    symlink(&ts, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    for (key, _) in files {
        if std::fs::symlink_metadata(dir.join(key)).is_err() {
            symlink(Path::new("..data").join(key), dir.join(key))?;
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && !files.iter().any(|(k, _)| *k == name) {
            std::fs::remove_file(dir.join(name.as_ref()))?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

struct Mesh {
    _world: World,
    n2: Node,
    client: Pod,
    intruder: Pod,
    server: Pod,
    a2: Agent,
}

fn to(m: &Mesh) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(m.server.ip4), 8080)
}

/// Starts n2's agent as the DaemonSet does: a node config shared by every node (its `node` is not
/// this node's name) and the name from `NODE_NAME`.
fn start_agent_with_node_name_env(world: &World, node: &Node) -> Result<Agent> {
    let shared = std::fs::read_to_string(node.config_path())?.replace(
        &format!("node: {}\n", node.name),
        "node: set-by-node-name\n",
    );
    std::fs::write(node.config_path(), shared)?;
    let mut cmd = node.command(ferry_bin());
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(node.config_path())
        .env("FERRY_LOG", "info")
        .env("NODE_NAME", &node.name);
    let p = world.spawn(cmd, "agent-n2")?;
    let agent = Agent {
        pid: p.pid,
        log_path: p.out.clone(),
        node: node.name.clone(),
    };
    agent.wait_for(|l| l.msg() == "ready", Duration::from_secs(20))?;
    Ok(agent)
}

fn mesh() -> Result<Mesh> {
    let ShopAndLab {
        world,
        n1,
        n2,
        client,
        intruder,
        server,
    } = ShopAndLab::new()?;
    // The first projection of the volume, before the agent starts, as on a pod's first start.
    kubelet_project(
        &n2.policies_dir(),
        "2026_11_25_10_00_00.123",
        &[("cart.yaml", ALLOW_FRONTEND), ("payments.yaml", PAYMENTS)],
    )?;
    let a1 = world.start_agent(&n1)?;
    let a2 = start_agent_with_node_name_env(&world, &n2)?;
    let mut srv = server.command(testapp());
    srv.args(["serve", "--listen", "0.0.0.0:8080", "--tag", "cart"]);
    let app = world.spawn(srv, "cart")?;
    app.wait_for_output("listening", Duration::from_secs(5))?;
    // The world kills its processes on drop; these handles are not needed past here.
    drop((a1, app));
    Ok(Mesh {
        _world: world,
        n2,
        client,
        intruder,
        server,
        a2,
    })
}

#[test]
fn a_kubelet_configmap_swap_changes_decisions_without_a_restart() -> Result<()> {
    let m = mesh()?;
    // The node name came from NODE_NAME: n2's pods are enrolled and the agent reports it.
    let status = m.n2.cli(&["status"])?;
    assert_eq!(status["node"], "n2", "{status}");
    let p = m.n2.cli(&["policies"])?;
    assert_eq!(
        p.as_array().map(Vec::len),
        Some(2),
        "both keys loaded once, the ..data links skipped: {p}"
    );

    let d = dial(m.client.command(testapp()), to(&m), "before")?;
    assert!(d.ok && d.echo == "before", "frontend is allowed: {d:?}");
    let d = dial(m.intruder.command(testapp()), to(&m), "x")?;
    assert!(!d.ok, "lab is refused: {d:?}");

    // The ConfigMap is edited: cart.yaml flips, payments.yaml is dropped.
    kubelet_project(
        &m.n2.policies_dir(),
        "2026_11_25_10_05_00.456",
        &[("cart.yaml", ALLOW_LAB)],
    )?;
    m.a2.wait_for(|l| l.msg() == "policies reloaded", Duration::from_secs(10))?;
    assert!(
        !m.n2
            .policies_dir()
            .join("..2026_11_25_10_00_00.123")
            .exists()
            && !m.n2.policies_dir().join("payments.yaml").exists(),
        "the swap is complete"
    );

    let d = dial(m.intruder.command(testapp()), to(&m), "after")?;
    assert!(d.ok && d.echo == "after", "lab is now allowed: {d:?}");
    let d = dial(m.client.command(testapp()), to(&m), "x")?;
    assert!(!d.ok, "frontend is now refused: {d:?}");
    let p = m.n2.cli(&["policies"])?;
    assert_eq!(p.as_array().map(Vec::len), Some(1), "{p}");
    assert_eq!(p[0]["id"], "shop/cart", "{p}");

    // Same process throughout, and the swap was never seen half done.
    assert!(
        Path::new(&format!("/proc/{}", m.a2.pid)).exists(),
        "the agent kept running"
    );
    let starts = m.a2.lines().iter().filter(|l| l.msg() == "ready").count();
    assert_eq!(starts, 1, "the agent did not restart");
    let rejected: Vec<String> =
        m.a2.lines()
            .into_iter()
            .filter(|l| l.msg().starts_with("policies rejected"))
            .map(|l| l.0.to_string())
            .collect();
    assert!(rejected.is_empty(), "{rejected:?}");
    let status = m.n2.cli(&["status"])?;
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
    Ok(())
}

/// The default policies shipped in deploy/policies.yaml pass `ferry policy lint` (errors and warnings).
#[test]
fn the_shipped_policies_configmap_lints_clean() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies.yaml");
    let cm: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let data = cm["data"]
        .as_mapping()
        .context("deploy/policies.yaml has no data")?;
    let dir = std::env::temp_dir().join(format!("ferry-cm-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (key, value) in data {
        let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
            anyhow::bail!("a non-string key or value in deploy/policies.yaml");
        };
        std::fs::write(dir.join(key), value)?;
    }
    let out = std::process::Command::new(ferry_bin())
        .args(["policy", "lint"])
        .arg(&dir)
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{} policies, 0 errors, 0 warnings", data.len())),
        "{text}"
    );
    Ok(())
}

/// During a DaemonSet surge the next agent binds the shared admin socket path (hostPath /run/ferry)
/// while the old one drains: the old one must not remove the newcomer's socket when it exits.
#[test]
fn an_exiting_agent_leaves_a_newer_agents_admin_socket_in_place() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let agent = world.start_agent(&node)?;
    let socket = node.admin_socket();
    std::fs::remove_file(&socket)?;
    let _newcomer = std::os::unix::net::UnixListener::bind(&socket)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid as i32),
        nix::sys::signal::SIGTERM,
    )?;
    let exited = ferry_e2e::eventually(Duration::from_secs(15), || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", agent.pid)).unwrap_or_default();
        status.is_empty() || status.contains("State:\tZ")
    });
    assert!(exited, "the agent did not exit after SIGTERM");
    assert!(socket.exists(), "the newcomer's admin socket was removed");
    Ok(())
}
