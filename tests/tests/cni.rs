//! `ferry-cni` chained after the real `bridge` and `host-local` plugins (Debian's
//! containernetworking-plugins), invoked through the CNI protocol (environment and stdin) exactly as
//! a container runtime does, inside a test-world node, with the agent learning the pod from a fake
//! Kubernetes API server. Needs root.
use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ferry_e2e::{
    Agent, Node, NodeOptions, Pod, World, dial, eventually, ferry_cni_bin,
    kube_api::{FakeApi, pod_object},
    testapp,
};
use serde_json::{Value, json};

const CNI_BIN: &str = "/usr/lib/cni";
const NOWHERE: &str = "203.0.113.7:8080";

struct Call<'a> {
    node: &'a Node,
    netns: &'a str,
    container: &'a str,
    pod: (&'a str, &'a str, &'a str),
}

impl Call<'_> {
    /// Runs one plugin as the runtime does: `CNI_*` in the environment, the config on stdin, the
    /// result (or error) on stdout; in the node's netns.
    fn run(&self, plugin: &Path, command: &str, conf: &Value) -> Result<(bool, Value)> {
        let (ns, name, uid) = self.pod;
        let mut cmd = self.node.command(plugin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", self.container)
            .env("CNI_NETNS", format!("/var/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={uid}",
                    self.container
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(stdout.trim())
                .with_context(|| format!("{} printed {stdout:?}", plugin.display()))?
        };
        Ok((out.status.success(), value))
    }
}

fn bridge_conf(data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "ferry-test",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "198.18.9.0/24"}], [{"subnet": "2001:db8:9::/64"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dataDir": data_dir
        }
    })
}

fn ferry_conf(socket: &Path, prev: &Value) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "ferry-test",
        "type": "ferry-cni",
        "agentSocket": socket,
        "prevResult": prev
    })
}

fn captured_count(agent: &Agent, key: &str) -> usize {
    agent
        .access_lines()
        .iter()
        .filter(|l| {
            l.field("dst").as_deref() == Some(NOWHERE) && l.field("pod").as_deref() == Some(key)
        })
        .count()
}

#[test]
fn chained_after_bridge_it_enrolls_on_add_unenrolls_on_del_and_fails_without_agent() -> Result<()> {
    if !Path::new(CNI_BIN).join("bridge").exists() {
        bail!("{CNI_BIN}/bridge is missing: run `cargo xtask setup` (containernetworking-plugins)");
    }
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let api = FakeApi::start(&node)?;
    api.put_namespace("shop", &[("ferry.io/mesh", "enabled")]);
    let kubeconfig = api.write_kubeconfig(&node.dir.join("kubeconfig"))?;
    let socket = node.dir.join("cni.sock");
    world.write_config(
        &node,
        &NodeOptions {
            kubernetes: Some(format!(
                "{{kubeconfig: {}, cgroup_driver: cgroupfs, cni_socket: {}}}",
                kubeconfig.display(),
                socket.display()
            )),
            ..Default::default()
        },
    )?;

    // The kubelet made the pod's cgroup and the runtime its netns; the API has the pod, scheduled
    // here but without addresses yet (the CNI plugins give them).
    let uid = "c0ffee00-1234-4abc-8def-000000000001";
    let cgroup = node
        .cgroup_root
        .join(format!("kubepods/burstable/pod{uid}"));
    let app_cgroup = cgroup.join("app");
    std::fs::create_dir_all(&app_cgroup)?;
    let netns = world.add_pod_netns(&node, "web")?;
    let pod = Pod {
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "default".into(),
        node: node.name.clone(),
        netns: netns.clone(),
        cgroup: cgroup.clone(),
        app_cgroup,
        ip4: Ipv4Addr::UNSPECIFIED,
        ip6: Ipv6Addr::UNSPECIFIED,
    };
    let mut obj = pod_object(&pod, uid, &[], "Burstable", false);
    obj["status"] = json!({"phase": "Pending", "qosClass": "Burstable"});
    api.put_pod(obj);
    let agent = world.start_agent(&node)?;

    let data_dir = world.dir.join("host-local");
    let call = Call {
        node: &node,
        netns: &netns,
        container: "0123456789abcdef",
        pod: ("shop", "web", uid),
    };
    let bridge = PathBuf::from(CNI_BIN).join("bridge");
    let (ok, prev) = call.run(&bridge, "ADD", &bridge_conf(&data_dir))?;
    assert!(ok, "bridge ADD: {prev}");
    let ip: IpAddr = prev["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .context("bridge result without an address")?;

    // ADD: the result passes through unchanged, and the pod is enrolled when ADD returns.
    let (ok, result) = call.run(&ferry_cni_bin(), "ADD", &ferry_conf(&socket, &prev))?;
    assert!(ok, "ferry-cni ADD: {result}");
    assert_eq!(result, prev, "the previous result passes through unchanged");
    // The very first connect of the pod's first process is captured.
    let key = "shop/web";
    let _ = dial(pod.command(testapp()), NOWHERE.parse()?, "first")?;
    assert!(
        eventually(Duration::from_secs(3), || captured_count(&agent, key) == 1),
        "the first connect after ADD must be captured"
    );
    let line = agent.wait_for(|l| l.msg() == "pod enrolled", Duration::from_secs(1))?;
    assert_eq!(line.field("pod").as_deref(), Some(key));
    let rows = node.cli(&["workloads"])?;
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "web"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["enrolled"], true, "{rows}");
    assert!(
        row["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|i| i.as_str() == Some(&ip.to_string()))),
        "the addresses come from the CNI result: {row}"
    );

    // CHECK: enrolled, so fine.
    let (ok, out) = call.run(&ferry_cni_bin(), "CHECK", &ferry_conf(&socket, &prev))?;
    assert!(ok, "CHECK of an enrolled pod: {out}");

    // DEL (the runtime goes through the chain backwards): un-enrolled, no longer captured.
    let (ok, out) = call.run(&ferry_cni_bin(), "DEL", &ferry_conf(&socket, &prev))?;
    assert!(ok, "ferry-cni DEL: {out}");
    agent.wait_for(
        |l| l.msg() == "pod un-enrolled" && l.field("pod").as_deref() == Some(key),
        Duration::from_secs(2),
    )?;
    let _ = dial(pod.command(testapp()), NOWHERE.parse()?, "after")?;
    // The dial failed at once (no route); had it been captured, its access line would be written
    // within milliseconds of that.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(captured_count(&agent, key), 1, "not captured after DEL");
    // CHECK answers honestly: the pod must be meshed and is not enrolled.
    let (ok, out) = call.run(&ferry_cni_bin(), "CHECK", &ferry_conf(&socket, &prev))?;
    assert!(!ok, "CHECK after DEL must fail: {out}");
    assert!(
        out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("not enrolled")),
        "{out}"
    );
    let (ok, out) = call.run(&bridge, "DEL", &bridge_conf(&data_dir))?;
    assert!(ok, "bridge DEL: {out}");

    // No agent: ADD of a pod that may need the mesh fails with a CNI error, so the kubelet retries.
    let (ok, prev2) = call.run(&bridge, "ADD", &bridge_conf(&data_dir))?;
    assert!(ok, "{prev2}");
    let gone = node.dir.join("no-agent.sock");
    let (ok, err) = call.run(&ferry_cni_bin(), "ADD", &ferry_conf(&gone, &prev2))?;
    assert!(!ok, "ADD without an agent must fail: {err}");
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("not reachable")),
        "{err}"
    );
    // A pod of an excluded namespace (the agent's own) starts without an agent.
    let system = Call {
        pod: (
            "ferry-system",
            "ferry-agent-x",
            "c0ffee00-1234-4abc-8def-000000000002",
        ),
        ..call
    };
    let (ok, out) = system.run(&ferry_cni_bin(), "ADD", &ferry_conf(&gone, &prev2))?;
    assert!(ok && out == prev2, "{out}");
    let (ok, out) = call.run(&bridge, "DEL", &bridge_conf(&data_dir))?;
    assert!(ok, "{out}");
    Ok(())
}

/// The DaemonSet's installer: `ferry-cni install --watch` copies the plugin, chains it into the
/// primary config, puts it back when the network plugin rewrites the config, and takes it out on
/// SIGTERM — unless another installer (a rolling update's new pod) is running.
#[test]
fn the_installer_chains_rechains_and_unchains_on_termination() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ferry-t-install-{}", std::process::id()));
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&conf)?;
    let primary = conf.join("10-bridge.conflist");
    let original = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]});
    std::fs::write(&primary, original.to_string())?;
    let types = || -> Vec<String> {
        std::fs::read_to_string(&primary)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v["plugins"].as_array().map(|a| {
                    a.iter()
                        .map(|p| p["type"].as_str().unwrap_or("").to_owned())
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let start = |name: &str| -> Result<Installer> {
        let child = std::process::Command::new(ferry_cni_bin())
            .args(["install", "--watch", "--bin-dir"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .env("HOSTNAME", name)
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Installer(child))
    };
    // Removed also when an assertion panics.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Dir(dir.clone());
    let mut first = start("agent-old")?;
    assert!(eventually(Duration::from_secs(5), || types()
        == ["bridge", "ferry-cni"]));
    assert!(bin.join("ferry-cni").is_file());
    // The network plugin rewrites its config: chained again within a pass.
    std::fs::write(&primary, original.to_string())?;
    assert!(eventually(Duration::from_secs(8), || types()
        == ["bridge", "ferry-cni"]));
    // A rolling update: a second installer runs; the first one stops and leaves the chain.
    let mut second = start("agent-new")?;
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::SIGTERM,
    )?;
    assert!(first.0.wait()?.success());
    assert_eq!(
        types(),
        ["bridge", "ferry-cni"],
        "the new installer keeps the chain"
    );
    // Uninstall: the last installer stops and takes ferry-cni out.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.0.id() as i32),
        nix::sys::signal::SIGTERM,
    )?;
    assert!(second.0.wait()?.success());
    assert_eq!(types(), ["bridge"], "no ferry-cni left without an agent");
    Ok(())
}

/// An installer process, killed if the test ends (or panics) while it runs.
struct Installer(std::process::Child);

impl Drop for Installer {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
