//! Capture on the real kernel: eBPF connect/getpeername/sockops/sk_lookup with real agents in a netns
//! test world. Needs root.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use ferry_e2e::{Agent, Node, Pod, World, dial, eventually, run_with_timeout, testapp};

const APP_PORT: u16 = 7777;

/// One node with pods `a` (enrolled) and `b`; a listener on the node; the agent running.
struct OneNode {
    world: World,
    node: Node,
    a: Pod,
    agent: Agent,
}

fn one_node() -> Result<OneNode> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let a = world.add_pod(&node, "a", 10)?;
    world.write_workloads(&node, &[&a])?;
    let agent = world.start_agent(&node)?;
    agent.wait_for(|l| l.msg() == "pod enrolled", Duration::from_secs(5))?;
    Ok(OneNode {
        world,
        node,
        a,
        agent,
    })
}

fn serve(
    world: &World,
    mut cmd: std::process::Command,
    listen: &str,
    tag: &str,
) -> Result<ferry_e2e::Proc> {
    cmd.args(["serve", "--listen", listen, "--tag", tag]);
    let p = world.spawn(cmd, tag)?;
    p.wait_for_output("listening", Duration::from_secs(5))?;
    Ok(p)
}

fn access_to(agent: &Agent, dst: SocketAddr) -> Vec<ferry_e2e::LogLine> {
    agent
        .access_lines()
        .into_iter()
        .filter(|l| l.field("dst").as_deref() == Some(&dst.to_string()))
        .collect()
}

/// (a) A connect to an address with no route is captured: it reaches the agent, which logs the
/// original destination; the app's getpeername() shows what it dialled.
#[test]
fn outbound_connect_reaches_agent_with_original_destination() -> Result<()> {
    let t = one_node()?;
    let dst: SocketAddr = "203.0.113.7:8080".parse()?;
    let d = dial(t.a.command(testapp()), dst, "hi")?;
    // Captured: the connect reached the agent although nothing routes there (uncaptured, it fails
    // with "Network is unreachable"); the agent then could not reach the destination and reset the
    // connection — so fast that connect() itself may report the reset. getpeername is checked below,
    // on a connection that stays up.
    assert!(!d.ok && !d.error.contains("unreachable"), "{d:?}");
    let line = t.agent.wait_for(
        |l| l.is_access() && l.field("dst").as_deref() == Some("203.0.113.7:8080"),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("pod").as_deref(), Some("default/a"));
    assert_eq!(line.field("direction").as_deref(), Some("outbound"));
    assert_eq!(line.field("result").as_deref(), Some("unreachable"));

    // And with a real listener (on the node), the agent connects from inside the pod's netns: the
    // listener sees the pod's address, the app sees the address it dialled.
    let node_listener = SocketAddr::new(IpAddr::V4(t.node.gateway4()), 9000);
    let _srv = serve(
        &t.world,
        t.node.command(testapp()),
        &node_listener.to_string(),
        "node",
    )?;
    let d = dial(t.a.command(testapp()), node_listener, "ping")?;
    assert!(d.ok, "{d:?}");
    assert_eq!(d.peer, Some(node_listener));
    assert_eq!(
        d.greeting_field("peer")
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
        Some(IpAddr::V4(t.a.ip4))
    );
    assert_eq!(d.echo, "ping");
    assert!(
        !access_to(&t.agent, node_listener).is_empty(),
        "the agent must have carried it"
    );
    Ok(())
}

/// (b) Two pods with identical IPs on two nodes (and their loopback source ports, which collide
/// freely) never see each other's original destinations, under 200 concurrent connects.
#[test]
fn identical_pod_ips_on_two_nodes_never_mix_original_destinations() -> Result<()> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, false)?;
    let n2 = world.add_node("n2", 1, false)?; // same pod subnet: identical pod IPs
    let x = world.add_pod(&n1, "x", 10)?;
    let y = world.add_pod(&n2, "y", 10)?;
    assert_eq!(x.ip4, y.ip4);
    world.write_workloads(&n1, &[&x])?;
    world.write_workloads(&n2, &[&y])?;
    let a1 = world.start_agent(&n1)?;
    let a2 = world.start_agent(&n2)?;
    for a in [&a1, &a2] {
        a.wait_for(|l| l.msg() == "pod enrolled", Duration::from_secs(5))?;
    }
    // Each node's gateway answers on 100 ports, tagged with the node's name.
    let mut cmd1 = n1.command(testapp());
    cmd1.args([
        "serve",
        "--ports",
        "20000-20099",
        "--ip",
        "198.18.1.1",
        "--tag",
        "n1",
    ]);
    let s1 = world.spawn(cmd1, "srv-n1")?;
    let mut cmd2 = n2.command(testapp());
    cmd2.args([
        "serve",
        "--ports",
        "21000-21099",
        "--ip",
        "198.18.1.1",
        "--tag",
        "n2",
    ]);
    let s2 = world.spawn(cmd2, "srv-n2")?;
    for s in [&s1, &s2] {
        s.wait_for_output("listening", Duration::from_secs(10))?;
    }
    let targets = |base: u16| -> String {
        (0..100)
            .map(|i| format!("198.18.1.1:{}", base + i))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut c1 = x.command(testapp());
    c1.args(["dial-many", "--to", &targets(20000), "--timeout-ms", "5000"]);
    let mut c2 = y.command(testapp());
    c2.args(["dial-many", "--to", &targets(21000), "--timeout-ms", "5000"]);
    let h1 = std::thread::spawn(move || run_with_timeout(c1, Duration::from_secs(60)));
    let h2 = std::thread::spawn(move || run_with_timeout(c2, Duration::from_secs(60)));
    let out1 = h1
        .join()
        .map_err(|_| anyhow::anyhow!("dialer panicked"))??;
    let out2 = h2
        .join()
        .map_err(|_| anyhow::anyhow!("dialer panicked"))??;
    for (out, tag, base) in [(out1, "n1", 20000u16), (out2, "n2", 21000u16)] {
        let dials: Vec<ferry_e2e::Dial> = out
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(dials.len(), 100);
        let mut ports = HashSet::new();
        for d in &dials {
            assert!(d.ok, "{tag}: {d:?}");
            // The server that answered is the dialled one, on the dialler's own node.
            assert!(d.greeting.starts_with(&format!("{tag} ")), "{tag}: {d:?}");
            assert_eq!(
                d.greeting_field("local").and_then(|l| l.parse().ok()),
                d.peer,
                "{d:?}"
            );
            ports.insert(d.peer.map(|p| p.port()).unwrap_or(0));
        }
        assert_eq!(ports, (base..base + 100).collect::<HashSet<_>>());
    }
    // Each agent carried exactly its own pod's 100 connections.
    for (a, base) in [(&a1, 20000u16), (&a2, 21000u16)] {
        let lines = a.access_lines();
        assert_eq!(
            lines.len(),
            100,
            "agent on {} logged {} connections",
            a.node,
            lines.len()
        );
        for l in lines {
            let dst: SocketAddr = l.field("dst").unwrap_or_default().parse()?;
            assert!(
                (base..base + 100).contains(&dst.port()),
                "{} carried {dst}",
                a.node
            );
        }
    }
    Ok(())
}

/// (c) Processes outside enrolled pod cgroups are not captured — in the node's netns, and in a pod's
/// netns but another cgroup below the node's cgroup root.
#[test]
fn processes_outside_enrolled_cgroups_are_not_captured() -> Result<()> {
    let t = one_node()?;
    let listener = SocketAddr::new(IpAddr::V4(t.node.gateway4()), 9001);
    let srv = serve(
        &t.world,
        t.node.command(testapp()),
        &listener.to_string(),
        "node",
    )?;
    let outside = t.world.unenrolled_cgroup(&t.node, "system")?;
    let d = dial(
        t.a.command_outside_cgroup(testapp(), &outside),
        listener,
        "x",
    )?;
    assert!(d.ok, "{d:?}");
    assert_eq!(
        d.local.map(|l| l.ip()),
        Some(IpAddr::V4(t.a.ip4)),
        "direct, not via loopback: {d:?}"
    );
    let d = dial(t.node.command(testapp()), listener, "y")?;
    assert!(d.ok, "{d:?}");
    assert_eq!(
        srv.output().matches("accepted").count(),
        2,
        "the listener got both connections"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(t.agent.access_lines().is_empty(), "the agent saw nothing");
    Ok(())
}

/// (d) Inbound connections to any port of a pod reach the agent; the agent's delivery reaches the app.
#[test]
fn inbound_to_any_port_reaches_agent_and_delivery_reaches_app() -> Result<()> {
    let t = one_node()?;
    let app = serve(
        &t.world,
        t.a.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "app-a",
    )?;
    let to = SocketAddr::new(IpAddr::V4(t.a.ip4), APP_PORT);
    let d = dial(t.node.command(testapp()), to, "hello")?;
    assert!(d.ok, "{d:?}");
    assert!(d.greeting.starts_with("app-a "), "{d:?}");
    assert_eq!(d.echo, "hello");
    let line = t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("direction").as_deref(), Some("inbound"));
    assert_eq!(line.field("bytes_sent").as_deref(), Some("5"));
    assert_eq!(app.output().matches("accepted").count(), 1);

    // A port nobody listens on still reaches the agent (and the client gets a reset from it).
    let closed = SocketAddr::new(IpAddr::V4(t.a.ip4), 4444);
    let d = dial(t.node.command(testapp()), closed, "x")?;
    assert!(!d.ok, "{d:?}");
    t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(closed.to_string()),
        Duration::from_secs(5),
    )?;
    Ok(())
}

/// (e) Un-enrolling a pod stops capture for new connections at once.
#[test]
fn unenrolling_a_pod_stops_capture_at_once() -> Result<()> {
    let t = one_node()?;
    let _app = serve(
        &t.world,
        t.a.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "app-a",
    )?;
    t.world.write_workloads(&t.node, &[])?;
    t.agent
        .wait_for(|l| l.msg() == "pod un-enrolled", Duration::from_secs(5))?;
    let dst: SocketAddr = "203.0.113.9:80".parse()?;
    let d = dial(t.a.command(testapp()), dst, "x")?;
    assert!(
        !d.ok && d.error.contains("unreachable"),
        "no longer captured, so no route: {d:?}"
    );
    let to = SocketAddr::new(IpAddr::V4(t.a.ip4), APP_PORT);
    let d = dial(t.node.command(testapp()), to, "direct")?;
    assert!(d.ok, "{d:?}");
    assert_eq!(
        d.greeting_field("peer")
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
        Some(IpAddr::V4(t.node.gateway4())),
        "straight from the client: {d:?}"
    );
    assert!(
        t.agent.access_lines().is_empty(),
        "{:?}",
        t.agent
            .access_lines()
            .iter()
            .map(|l| l.0.to_string())
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// (f) With the agent killed, an enrolled pod's traffic fails closed both ways; a new agent re-opens
/// the pinned state and capture works again.
#[test]
fn agent_killed_fails_closed_and_a_new_agent_resumes() -> Result<()> {
    let t = one_node()?;
    let app = serve(
        &t.world,
        t.a.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "app-a",
    )?;
    let listener = SocketAddr::new(IpAddr::V4(t.node.gateway4()), 9002);
    let srv = serve(
        &t.world,
        t.node.command(testapp()),
        &listener.to_string(),
        "node",
    )?;
    t.agent.kill9();

    let d = dial(t.a.command(testapp()), listener, "leak?")?;
    assert!(!d.ok, "outbound must fail without the agent: {d:?}");
    let to = SocketAddr::new(IpAddr::V4(t.a.ip4), APP_PORT);
    let d = dial(t.node.command(testapp()), to, "leak?")?;
    assert!(
        !d.ok,
        "inbound must not reach the app without the agent: {d:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        srv.output().matches("accepted").count(),
        0,
        "the real listener received nothing"
    );
    assert_eq!(
        app.output().matches("accepted").count(),
        0,
        "the app received nothing"
    );
    assert!(app.is_running(), "the app's listener is untouched");

    let agent = t.world.start_agent(&t.node)?;
    let attached = agent.wait_for(|l| l.msg() == "capture attached", Duration::from_secs(5))?;
    assert_eq!(attached.field("reopened").as_deref(), Some("true"));
    let d = dial(t.a.command(testapp()), listener, "again")?;
    assert!(d.ok && d.echo == "again", "{d:?}");
    let d = dial(t.node.command(testapp()), to, "in")?;
    assert!(d.ok && d.echo == "in", "{d:?}");
    assert_eq!(agent.access_lines().len(), 2);
    Ok(())
}

/// (g) IPv6 in a dual-stack pod: outbound capture with the original destination, getpeername, and
/// inbound delivery.
#[test]
fn ipv6_outbound_and_inbound_in_a_dual_stack_pod() -> Result<()> {
    let t = one_node()?;
    let dst: SocketAddr = "[2001:db8:77::1]:8080".parse()?;
    let d = dial(t.a.command(testapp()), dst, "hi")?;
    assert_eq!(d.peer, Some(dst), "{d:?}");
    t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(dst.to_string()),
        Duration::from_secs(5),
    )?;

    let node_listener = SocketAddr::new(IpAddr::V6(t.node.gateway6()), 9003);
    let _srv = serve(
        &t.world,
        t.node.command(testapp()),
        &node_listener.to_string(),
        "node6",
    )?;
    let d = dial(t.a.command(testapp()), node_listener, "v6")?;
    assert!(d.ok && d.echo == "v6", "{d:?}");
    assert_eq!(d.peer, Some(node_listener));
    assert_eq!(
        d.greeting_field("peer")
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
        Some(IpAddr::V6(t.a.ip6))
    );

    let _app = serve(
        &t.world,
        t.a.command(testapp()),
        &format!("[::]:{APP_PORT}"),
        "app6",
    )?;
    let to = SocketAddr::new(IpAddr::V6(t.a.ip6), APP_PORT);
    let d = dial(t.node.command(testapp()), to, "in6")?;
    assert!(
        d.ok && d.echo == "in6" && d.greeting.starts_with("app6 "),
        "{d:?}"
    );
    assert!(eventually(Duration::from_secs(5), || !access_to(
        &t.agent, to
    )
    .is_empty()));
    Ok(())
}

/// Bypass: loopback destinations, excluded ports and excluded CIDRs are never captured.
#[test]
fn loopback_and_configured_exclusions_are_not_captured() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    let a = world.add_pod(&node, "a", 10)?;
    world.write_config(
        &node,
        &ferry_e2e::NodeOptions {
            extra: "capture:\n  exclude_ports: [9100]\n  exclude_cidrs: [192.0.2.0/24, 2001:db8:99::/48]\n".into(),
            ..Default::default()
        },
    )?;
    world.write_workloads(&node, &[&a])?;
    let agent = world.start_agent(&node)?;
    let gw = IpAddr::V4(node.gateway4());
    let _srv = serve(
        &world,
        node.command(testapp()),
        &format!("{gw}:9100,{gw}:9101"),
        "node",
    )?;
    let _local = serve(&world, a.command(testapp()), "127.0.0.1:7070", "self")?;

    // Excluded port: direct, so the socket's own address is the pod's, not loopback.
    let d = dial(a.command(testapp()), SocketAddr::new(gw, 9100), "x")?;
    assert!(
        d.ok && d.local.map(|l| l.ip()) == Some(IpAddr::V4(a.ip4)),
        "{d:?}"
    );
    // Control: a port that is not excluded is captured (the app's socket talks to the agent on loopback).
    let d = dial(a.command(testapp()), SocketAddr::new(gw, 9101), "x")?;
    assert!(
        d.ok && d.local.map(|l| l.ip().is_loopback()) == Some(true),
        "{d:?}"
    );
    // Excluded CIDRs (v4 and v6): not captured, so there is no route.
    for dst in ["192.0.2.1:80", "[2001:db8:99::1]:80"] {
        let d = dial(a.command(testapp()), dst.parse()?, "x")?;
        assert!(!d.ok && d.error.contains("unreachable"), "{dst}: {d:?}");
    }
    // Loopback: straight to the pod's own listener.
    let d = dial(a.command(testapp()), "127.0.0.1:7070".parse()?, "lo")?;
    assert!(d.ok && d.echo == "lo", "{d:?}");
    std::thread::sleep(Duration::from_millis(200));
    let carried: Vec<String> = agent
        .access_lines()
        .iter()
        .filter_map(|l| l.field("dst"))
        .collect();
    assert_eq!(carried, vec![format!("{gw}:9101")]);
    Ok(())
}

/// Pinned state of another map layout (an older agent's) is refused with a clear error naming the map,
/// instead of being used with keys of the wrong size.
#[test]
fn pinned_maps_of_another_layout_are_refused() -> Result<()> {
    let mut world = World::new()?;
    let node = world.add_node("n1", 1, false)?;
    std::fs::create_dir_all(node.bpffs_root.join("maps"))?;
    let stale = node.bpffs_root.join("maps/FERRY_SOCKETS");
    ferry_e2e::pin_hash_map(&stale, 16, 4)?;
    let mut cmd = node.command(ferry_e2e::ferry_bin());
    cmd.args(["run", "--config"]).arg(node.config_path());
    let err = match run_with_timeout(cmd, Duration::from_secs(10)) {
        Ok(out) => anyhow::bail!("the agent started on stale state: {out}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("FERRY_SOCKETS") && err.contains("ferry uninstall"),
        "{err}"
    );
    Ok(())
}
