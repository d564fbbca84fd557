//! The Kubernetes workload source against a local fake API server speaking the real list/watch
//! protocol with real Pod and Namespace objects: pods added, relabelled, deleted, namespaces
//! relabelled, the API connection dropped and resumed — with pod cgroups laid out as the kubelet lays
//! them out and real netns, so the enrolled pods' traffic is really captured. And the kubelet's
//! plaintext probes in strict mode. Needs root.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail};
use ferry_e2e::{
    Agent, Node, NodeOptions, Pod, World, dial, eventually,
    kube_api::{FakeApi, pod_object},
    testapp,
};

const MESH: &str = "ferry.io/mesh";
/// A documentation address nothing routes to: a connect there reaches the agent only if captured.
const NOWHERE: &str = "203.0.113.7:8080";

/// `enrolled` of `ns/name` in `ferry workloads`; `None` when the agent does not list it.
fn enrolled(node: &Node, key: &str) -> Option<bool> {
    let rows = node.cli(&["workloads"]).ok()?;
    rows.as_array()?
        .iter()
        .find(|r| {
            format!(
                "{}/{}",
                r["namespace"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or("")
            ) == key
        })
        .and_then(|r| r["enrolled"].as_bool())
}

fn wait_enrolled(node: &Node, key: &str, want: bool) -> Result<()> {
    if eventually(Duration::from_secs(10), || {
        enrolled(node, key).unwrap_or(false) == want
    }) {
        return Ok(());
    }
    bail!(
        "{key} should be {}enrolled; workloads: {:?}",
        if want { "" } else { "un-" },
        node.cli(&["workloads"])
    )
}

/// Whether a connect from `pod` to [`NOWHERE`] reaches the agent (is captured).
fn captured(agent: &Agent, pod: &Pod) -> Result<bool> {
    let before = count_nowhere(agent, pod);
    let _ = dial(pod.command(testapp()), NOWHERE.parse()?, "x")?;
    Ok(eventually(Duration::from_secs(5), || {
        count_nowhere(agent, pod) > before
    }))
}

fn count_nowhere(agent: &Agent, pod: &Pod) -> usize {
    agent
        .access_lines()
        .iter()
        .filter(|l| l.field("dst").as_deref() == Some(NOWHERE) && l.field("pod") == Some(pod.key()))
        .count()
}

fn kube_config(api: &FakeApi, node: &Node, driver: &str) -> Result<NodeOptions> {
    let kubeconfig = api.write_kubeconfig(&node.dir.join("kubeconfig"))?;
    Ok(NodeOptions {
        kubernetes: Some(format!(
            "{{kubeconfig: {}, cgroup_driver: {driver}, cni_socket: cni.sock}}",
            kubeconfig.display()
        )),
        ..Default::default()
    })
}

/// The pod cgroup the kubelet's systemd driver makes for a Burstable pod.
fn systemd_burstable(node: &Node, uid: &str) -> std::path::PathBuf {
    node.cgroup_root
        .join("kubepods.slice/kubepods-burstable.slice")
        .join(format!(
            "kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ))
}

/// A pod process, so the agent can find the pod's netns from its cgroup (no CNI plugin here).
fn run_in(world: &World, pod: &Pod) -> Result<()> {
    world.serve(pod.command(testapp()), "0.0.0.0:7777", &pod.name)?;
    Ok(())
}

#[test]
fn pods_follow_their_labels_their_namespace_and_deletion() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let api = FakeApi::start(&node)?;
    api.put_namespace("shop", &[(MESH, "enabled")]);
    api.put_namespace("plain", &[]);
    api.put_namespace("later", &[]);

    let uid_a = "0b6f3c1e-1111-4a2b-9c3d-00000000000a";
    let a = world.add_pod_in(
        &node,
        "a",
        10,
        "shop",
        "web",
        systemd_burstable(&node, uid_a),
    )?;
    let uid_b = "0b6f3c1e-2222-4a2b-9c3d-00000000000b";
    let b_cg = node.cgroup_root.join(format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid_b.replace('-', "_")
    ));
    let b = world.add_pod_in(&node, "b", 11, "plain", "default", b_cg)?;
    let uid_c = "0b6f3c1e-3333-4a2b-9c3d-00000000000c";
    let c_cg = node.cgroup_root.join(format!(
        "kubepods.slice/kubepods-pod{}.slice",
        uid_c.replace('-', "_")
    ));
    let c = world.add_pod_in(&node, "c", 12, "later", "default", c_cg)?;
    for p in [&a, &b, &c] {
        run_in(&world, p)?;
    }
    api.put_pod(pod_object(&a, uid_a, &[("app", "web")], "Burstable", false));
    api.put_pod(pod_object(&b, uid_b, &[], "BestEffort", false));
    api.put_pod(pod_object(&c, uid_c, &[], "Guaranteed", false));
    // A host-network pod labelled for the mesh: never enrolled, never in the table (its address is
    // the node's).
    let host = Pod {
        name: "exporter".into(),
        namespace: "shop".into(),
        ..a.clone()
    };
    let mut host_obj = pod_object(
        &host,
        "0b6f3c1e-4444-4a2b-9c3d-00000000000d",
        &[(MESH, "enabled")],
        "BestEffort",
        true,
    );
    host_obj["status"]["podIPs"] = serde_json::json!([{"ip": "198.18.1.1"}]);
    host_obj["status"]["podIP"] = serde_json::json!("198.18.1.1");
    api.put_pod(host_obj);

    world.write_config(&node, &kube_config(&api, &node, "systemd")?)?;
    let agent = world.start_agent(&node)?;

    // Meshed through its namespace: enrolled in the kubelet's cgroup, its traffic captured.
    wait_enrolled(&node, "shop/a", true)?;
    assert!(captured(&agent, &a)?, "shop/a's connects must be captured");
    // Not meshed: in the table (outbound identity checks), as plain TCP, not enrolled.
    assert_eq!(enrolled(&node, "plain/b"), Some(false));
    assert!(!captured(&agent, &b)?, "plain/b must not be captured");
    assert_eq!(
        enrolled(&node, "shop/exporter"),
        None,
        "hostNetwork pods stay out"
    );
    let rows = node.cli(&["workloads"])?;
    let row_a = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "a"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        row_a["identity"].as_str(),
        Some("spiffe://cluster.local/ns/shop/sa/web"),
        "identity from namespace and service account"
    );

    // The pod opts in by its own label.
    api.put_pod(pod_object(
        &b,
        uid_b,
        &[(MESH, "enabled")],
        "BestEffort",
        false,
    ));
    wait_enrolled(&node, "plain/b", true)?;
    assert!(
        captured(&agent, &b)?,
        "plain/b labelled enabled must be captured"
    );

    // Opting out by label un-enrolls, though the namespace is meshed.
    api.put_pod(pod_object(
        &a,
        uid_a,
        &[(MESH, "disabled")],
        "Burstable",
        false,
    ));
    wait_enrolled(&node, "shop/a", false)?;
    assert!(
        !captured(&agent, &a)?,
        "shop/a opted out must not be captured"
    );

    // A namespace relabelled: its pods follow, both ways.
    api.put_namespace("later", &[(MESH, "enabled")]);
    wait_enrolled(&node, "later/c", true)?;
    assert!(
        captured(&agent, &c)?,
        "later/c must be captured once its namespace is meshed"
    );
    api.put_namespace("later", &[(MESH, "disabled")]);
    wait_enrolled(&node, "later/c", false)?;

    // Deleted: un-enrolled and gone from the table.
    api.delete_pod("plain", "b");
    assert!(
        eventually(Duration::from_secs(10), || enrolled(&node, "plain/b")
            .is_none()),
        "plain/b must be gone"
    );
    assert!(
        !captured(&agent, &b)?,
        "a deleted pod is no longer captured"
    );
    let watches = api
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true"))
        .count();
    assert!(
        watches >= 2,
        "the agent watches (not polls): {:?}",
        api.requests()
    );
    Ok(())
}

#[test]
fn a_lost_api_keeps_the_last_state_shows_it_and_resumes() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let api = FakeApi::start(&node)?;
    api.put_namespace("shop", &[(MESH, "enabled")]);
    let uid = "5e0d7a42-aaaa-4b2c-8d9e-000000000001";
    // The cgroupfs driver, a Burstable pod: kubepods/burstable/pod<uid>.
    let cg = node
        .cgroup_root
        .join(format!("kubepods/burstable/pod{uid}"));
    let a = world.add_pod_in(&node, "a", 10, "shop", "default", cg)?;
    let uid_b = "5e0d7a42-bbbb-4b2c-8d9e-000000000002";
    let cg_b = node
        .cgroup_root
        .join(format!("kubepods/besteffort/pod{uid_b}"));
    let b = world.add_pod_in(&node, "b", 11, "shop", "default", cg_b)?;
    run_in(&world, &a)?;
    run_in(&world, &b)?;
    api.put_pod(pod_object(&a, uid, &[], "Burstable", false));
    world.write_config(&node, &kube_config(&api, &node, "cgroupfs")?)?;
    let agent = world.start_agent(&node)?;
    wait_enrolled(&node, "shop/a", true)?;
    let status = node.cli(&["status"])?;
    assert_eq!(status["kubernetes"]["connected"], true, "{status}");
    assert!(metric(&node, "ferry_kube_api_connected")? == 1.0);

    api.go_down();
    assert!(
        eventually(Duration::from_secs(10), || {
            node.cli(&["status"])
                .map(|s| s["kubernetes"]["connected"] == false)
                .unwrap_or(false)
        }),
        "ferry status must show the lost connection"
    );
    assert_eq!(metric(&node, "ferry_kube_api_connected")?, 0.0);
    assert!(metric(&node, "ferry_kube_api_disconnects_total")? >= 1.0);
    let text = node.cli(&["status"])?;
    assert!(text["kubernetes"]["last_error"].is_string(), "{text}");
    // The last known state stays in force: the pod stays enrolled and captured.
    assert_eq!(enrolled(&node, "shop/a"), Some(true));
    assert!(
        captured(&agent, &a)?,
        "still captured while the API is away"
    );
    // Changes made while the agent cannot see them arrive after the reconnect (watch resumed from
    // the last resourceVersion).
    api.put_pod(pod_object(&b, uid_b, &[], "BestEffort", false));
    api.put_pod(pod_object(
        &a,
        uid,
        &[(MESH, "disabled")],
        "Burstable",
        false,
    ));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        enrolled(&node, "shop/a"),
        Some(true),
        "nothing changes while disconnected"
    );

    api.resume();
    assert!(
        eventually(Duration::from_secs(20), || {
            node.cli(&["status"])
                .map(|s| s["kubernetes"]["connected"] == true)
                .unwrap_or(false)
        }),
        "the agent must reconnect (backoff is capped at 8 s)"
    );
    wait_enrolled(&node, "shop/b", true)?;
    wait_enrolled(&node, "shop/a", false)?;
    assert!(captured(&agent, &b)?);
    assert_eq!(metric(&node, "ferry_kube_api_connected")?, 1.0);
    let resumed = api
        .requests()
        .iter()
        .any(|r| r.contains("watch=true") && !r.contains("resourceVersion=0"));
    assert!(resumed, "{:?}", api.requests());
    Ok(())
}

/// An agent that starts while the API is unreachable enrolls nothing and is not ready (a rolling
/// update keeps the previous agent), then catches up once the API answers.
#[test]
fn an_agent_starting_without_the_api_waits_for_its_first_list() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let api = FakeApi::start(&node)?;
    api.put_namespace("shop", &[(MESH, "enabled")]);
    let uid = "7d1e2f30-cccc-4d5e-9f60-000000000001";
    let a = world.add_pod_in(
        &node,
        "a",
        10,
        "shop",
        "default",
        systemd_burstable(&node, uid),
    )?;
    run_in(&world, &a)?;
    api.put_pod(pod_object(&a, uid, &[], "Burstable", false));
    world.write_config(&node, &kube_config(&api, &node, "systemd")?)?;
    api.go_down();
    // Not "ready": without a first list the agent neither enrolls nor takes over from a predecessor.
    let agent = world.spawn_agent(&node, &node.config_path(), &[])?;
    agent.wait_for(
        |l| l.msg() == "waiting for the first workload set before enrolling pods or taking over",
        Duration::from_secs(20),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let (code, body) = node.http_get("/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("Kubernetes API"), "{body}");
    let status = node.cli(&["status"])?;
    assert_eq!(status["kubernetes"]["synced"], false, "{status}");
    assert_eq!(status["enrolled_pods"], 0, "{status}");
    assert!(
        !captured(&agent, &a)?,
        "nothing enrolled before the first list"
    );
    api.resume();
    wait_enrolled(&node, "shop/a", true)?;
    assert!(eventually(Duration::from_secs(10), || {
        node.http_get("/readyz")
            .map(|(c, _)| c == 200)
            .unwrap_or(false)
    }));
    assert!(captured(&agent, &a)?);
    Ok(())
}

fn metric(node: &Node, name: &str) -> Result<f64> {
    let (code, body) = node.http_get("/metrics")?;
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{name} not in /metrics"))
}

/// In strict mode the kubelet's plaintext probes (from the node's address as the pod sees it,
/// `probe_sources`) reach the app; plaintext from another pod is still refused.
#[test]
fn probes_from_the_node_pass_strict_mode_and_nothing_else_plaintext_does() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let app = world.add_pod(&node, "app", 10)?;
    let other = world.add_pod(&node, "other", 20)?; // not enrolled: plain TCP
    world.write_workloads(&node, &[&app])?;
    world.write_config(
        &node,
        &NodeOptions {
            inbound: Some("strict"),
            extra: format!("probe_sources: [{}/32]\n", node.gateway4()),
            ..Default::default()
        },
    )?;
    let agent = world.start_agent(&node)?;
    agent.wait_for(|l| l.msg() == "pod enrolled", Duration::from_secs(5))?;
    let srv = world.serve(app.command(testapp()), "0.0.0.0:7777", "app")?;
    let to = SocketAddr::new(IpAddr::V4(app.ip4), 7777);

    let probe = dial(node.command(testapp()), to, "probe")?;
    assert!(probe.ok && probe.echo == "probe", "{probe:?}");
    let line = agent.wait_for(
        |l| l.is_access() && l.field("route").as_deref() == Some("probe"),
        Duration::from_secs(5),
    )?;
    assert_eq!(
        line.field("src").map(|s| s.starts_with("198.18.1.1:")),
        Some(true)
    );

    let d = dial(other.command(testapp()), to, "sneak")?;
    assert!(!d.ok, "plaintext from another pod must be refused: {d:?}");
    let refused = agent.wait_for(
        |l| {
            l.is_access()
                && l.field("route").as_deref() == Some("plaintext")
                && l.field("result").as_deref() == Some("refused")
        },
        Duration::from_secs(5),
    )?;
    assert_eq!(
        refused.field("src").map(|s| s.starts_with("198.18.1.20:")),
        Some(true)
    );
    assert_eq!(
        srv.output().matches("accepted").count(),
        1,
        "only the probe"
    );
    Ok(())
}
