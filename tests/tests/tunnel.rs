//! The node tunnel on the real datapath: pods on two nodes, agents carrying their traffic over mutual
//! TLS as HBONE. Needs root.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use ferry_e2e::{
    NodeOptions, Pod, Proc, Sniffer, TwoNodes, World, contains, dial, run_with_timeout, testapp,
};

const APP_PORT: u16 = 8080;

fn two_nodes() -> Result<TwoNodes> {
    TwoNodes::start(&NodeOptions::default(), &NodeOptions::default())
}

#[derive(Debug, serde::Deserialize)]
struct Bulk {
    ok: bool,
    #[serde(default)]
    received: usize,
    #[serde(default)]
    intact: bool,
    #[serde(default)]
    greeting: String,
}

fn bulk(mut cmd: Command, to: SocketAddr, bytes: usize, expect: Option<usize>) -> Result<Bulk> {
    cmd.args([
        "dial-bulk",
        "--to",
        &to.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--timeout-ms",
        "20000",
    ]);
    if let Some(e) = expect {
        cmd.args(["--expect", &e.to_string()]);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(120))?;
    serde_json::from_str(out.trim()).with_context(|| format!("parsing {out:?}"))
}

/// Bytes arrive intact both ways for 1 B, 64 KiB and 64 MiB, with half-close in each direction, and
/// the app on the destination sees the source pod's address.
#[test]
fn bytes_intact_both_ways_with_half_close() -> Result<()> {
    let t = two_nodes()?;
    let mut srv = t.server.command(testapp());
    srv.args([
        "serve",
        "--listen",
        &format!("0.0.0.0:{APP_PORT}"),
        "--tag",
        "cart",
    ]);
    let _echo = t.world.spawn(srv, "echo")?;
    let mut srv = t.server.command(testapp());
    srv.args([
        "serve",
        "--listen",
        "0.0.0.0:8081",
        "--tag",
        "first",
        "--send-first",
        "65536",
    ]);
    let first = t.world.spawn(srv, "first")?;
    for p in [&_echo, &first] {
        p.wait_for_output("listening", Duration::from_secs(5))?;
    }
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    for n in [1usize, 64 * 1024, 64 * 1024 * 1024] {
        let b = bulk(t.client.command(testapp()), to, n, None)?;
        assert!(b.ok && b.intact && b.received == n, "{n} bytes: {b:?}");
        // Client-first half-close: the client's FIN reached the app, whose echo still came back.
        let peer = b
            .greeting
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("peer="))
            .unwrap_or("");
        assert!(
            peer.starts_with(&format!("{}:", t.client.ip4)),
            "the app sees the client pod: {b:?}"
        );
    }
    // Server-first half-close: the app finishes sending, the client still sends afterwards.
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8081);
    let b = bulk(t.client.command(testapp()), to, 100_000, Some(65536))?;
    assert!(b.ok && b.intact, "{b:?}");
    first.wait_for_output("got 100000 intact=true", Duration::from_secs(10))?;
    let lines = t.a1.access_lines();
    assert!(
        lines
            .iter()
            .all(|l| l.field("route").as_deref() == Some("hbone")),
        "all via HBONE"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.field("bytes_sent").as_deref() == Some("67108864")),
        "byte counts in the access log"
    );
    let inbound = t.a2.access_lines();
    assert!(
        inbound.iter().all(|l| l.field("peer_identity").as_deref()
            == Some("spiffe://cluster.local/ns/shop/sa/frontend")),
        "the destination agent verified the client's identity"
    );
    let _ = &t.n1;
    let _ = &t.n2;
    Ok(())
}

fn echo_server(t: &TwoNodes, pod: &Pod, port: u16, tag: &str) -> Result<Proc> {
    let mut srv = pod.command(testapp());
    srv.args([
        "serve",
        "--listen",
        &format!("0.0.0.0:{port},[::]:{port}"),
        "--tag",
        tag,
    ]);
    let p = t.world.spawn(srv, tag)?;
    p.wait_for_output("listening", Duration::from_secs(5))?;
    Ok(p)
}

/// Strict inbound refuses plaintext from outside the mesh (and logs it); mesh traffic still flows.
#[test]
fn strict_inbound_refuses_plaintext_from_outside_the_mesh() -> Result<()> {
    let strict = NodeOptions {
        inbound: Some("strict"),
        ..Default::default()
    };
    let t = TwoNodes::start(&NodeOptions::default(), &strict)?;
    let app = echo_server(&t, &t.server, APP_PORT, "cart")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.n1.command(testapp()), to, "plain")?;
    assert!(
        !d.ok,
        "plaintext from node1's host netns must be refused: {d:?}"
    );
    let line = t.a2.wait_for(
        |l| l.is_access() && l.field("route").as_deref() == Some("plaintext"),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("result").as_deref(), Some("refused"));
    assert_eq!(
        app.output().matches("accepted").count(),
        0,
        "the app saw nothing"
    );
    let d = dial(t.client.command(testapp()), to, "mesh")?;
    assert!(d.ok && d.echo == "mesh", "{d:?}");
    assert_eq!(app.output().matches("accepted").count(), 1);
    Ok(())
}

/// On the node-to-node link the app's bytes never appear in clear; the same capture sees them when
/// they are sent as plain TCP (the control that proves the capture works).
#[test]
fn no_plaintext_on_the_node_link() -> Result<()> {
    let t = two_nodes()?;
    let _app = echo_server(&t, &t.server, APP_PORT, "cart")?;
    let marker = format!("FERRY-MARKER-{:016x}", rand_u64());
    let sniffer = Sniffer::start(&t.n1.netns, "fab0")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.client.command(testapp()), to, &marker)?;
    assert!(d.ok && d.echo == marker, "{d:?}");
    let frames = sniffer.stop()?;
    assert!(
        frames.len() > 1000,
        "the capture saw the tunnel's frames ({} bytes)",
        frames.len()
    );
    assert!(
        !contains(&frames, marker.as_bytes()),
        "the marker crossed the node link in clear"
    );

    // Control: node1's host netns (not captured) sends the same bytes as plain TCP across the link to
    // a listener on node2's host netns.
    let mut srv = t.n2.command(testapp());
    let n2_fab = t.n2.fabric_ip.context("n2 is routed")?;
    srv.args([
        "serve",
        "--listen",
        &format!("{n2_fab}:9999"),
        "--tag",
        "plain",
    ]);
    let p = t.world.spawn(srv, "plain")?;
    p.wait_for_output("listening", Duration::from_secs(5))?;
    let sniffer = Sniffer::start(&t.n1.netns, "fab0")?;
    let d = dial(
        t.n1.command(testapp()),
        SocketAddr::new(IpAddr::V4(n2_fab), 9999),
        &marker,
    )?;
    assert!(d.ok, "{d:?}");
    let frames = sniffer.stop()?;
    assert!(
        contains(&frames, marker.as_bytes()),
        "the capture must see plaintext TCP"
    );
    Ok(())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_ne_bytes(b)
}

/// The destination's agent killed mid-transfer: the client app sees a reset or EOF within 5 s.
#[test]
fn peer_agent_killed_mid_transfer_ends_the_connection_promptly() -> Result<()> {
    let t = two_nodes()?;
    let _app = echo_server(&t, &t.server, APP_PORT, "cart")?;
    let mut hold = t.client.command(testapp());
    hold.args([
        "hold",
        "--to",
        &format!("{}:{APP_PORT}", t.server.ip4),
        "--seconds",
        "30",
    ]);
    let h = t.world.spawn(hold, "hold")?;
    h.wait_for_output("connected", Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(300));
    let killed = std::time::Instant::now();
    t.a2.kill9();
    let ended = ferry_e2e::eventually(Duration::from_secs(5), || {
        h.output().contains("\"ok\":false")
    });
    assert!(
        ended,
        "the client still hangs {:?} after the peer agent died: {}",
        killed.elapsed(),
        h.output()
    );
    Ok(())
}

/// Workload certificates renewed during a long transfer (short TTL) do not break it, and connections
/// opened afterwards use the new certificates.
#[test]
fn certificate_renewal_during_a_long_transfer() -> Result<()> {
    let short = NodeOptions {
        workload_ttl: Some("4s"),
        ..Default::default()
    };
    let t = TwoNodes::start(&short, &short)?;
    let _app = echo_server(&t, &t.server, APP_PORT, "cart")?;
    let mut hold = t.client.command(testapp());
    hold.args([
        "hold",
        "--to",
        &format!("{}:{APP_PORT}", t.server.ip4),
        "--seconds",
        "7",
    ]);
    let h = t.world.spawn(hold, "hold")?;
    h.wait_for_output("connected", Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_secs(3));
    // Past half-life (2 s): new connections need new certificates; the old ones expire at 4 s.
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.client.command(testapp()), to, "after-renewal")?;
    assert!(d.ok && d.echo == "after-renewal", "{d:?}");
    h.wait_for_output("\"ok\":", Duration::from_secs(15))?;
    assert!(
        h.output().contains("\"ok\":true"),
        "the long transfer broke: {}",
        h.output()
    );
    let d = dial(t.client.command(testapp()), to, "after-expiry")?;
    assert!(d.ok && d.echo == "after-expiry", "{d:?}");
    Ok(())
}

/// 500 concurrent connections through one pair of agents all complete with intact bytes.
#[test]
fn five_hundred_concurrent_connections() -> Result<()> {
    let t = two_nodes()?;
    let _app = echo_server(&t, &t.server, APP_PORT, "cart")?;
    let to = format!("{}:{APP_PORT}", t.server.ip4);
    let targets = vec![to.as_str(); 500].join(",");
    let mut c = t.client.command(testapp());
    c.args(["dial-many", "--to", &targets, "--timeout-ms", "20000"]);
    let out = run_with_timeout(c, Duration::from_secs(120))?;
    let dials: Vec<ferry_e2e::Dial> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(dials.len(), 500);
    let failed: Vec<_> = dials
        .iter()
        .filter(|d| !(d.ok && d.echo == "x" && d.greeting.starts_with("cart ")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(ferry_e2e::eventually(Duration::from_secs(5), || t
        .a1
        .access_lines()
        .len()
        == 500));
    Ok(())
}

/// Destinations outside the mesh (a TCP workload, an unknown IP) go straight from the pod's netns,
/// or are refused when the node config says so.
#[test]
fn non_mesh_destinations_pass_through_or_are_refused() -> Result<()> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, true)?;
    let n2 = world.add_node("n2", 2, true)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let legacy = world.add_pod_as(&n2, "legacy", 30, "old", "default")?;
    let text = format!(
        "workloads:\n  - {{name: client, namespace: shop, service_account: frontend, node: n1, ips: [{}], netns: {}, cgroup: {}}}\n  - {{name: legacy, namespace: old, node: n2, ips: [{}], protocol: TCP}}\n",
        client.ip4,
        client.netns_path().display(),
        client.cgroup.display(),
        legacy.ip4
    );
    std::fs::write(n1.workloads_path(), &text)?;
    let a1 = world.start_agent(&n1)?;
    let mut srv = legacy.command(testapp());
    srv.args(["serve", "--listen", "0.0.0.0:8080", "--tag", "legacy"]);
    let p = world.spawn(srv, "legacy")?;
    p.wait_for_output("listening", Duration::from_secs(5))?;
    let to = SocketAddr::new(IpAddr::V4(legacy.ip4), 8080);
    let d = dial(client.command(testapp()), to, "old")?;
    assert!(d.ok && d.echo == "old", "{d:?}");
    assert_eq!(
        d.greeting_field("peer")
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
        Some(IpAddr::V4(client.ip4))
    );
    let line = a1.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("route").as_deref(), Some("passthrough"));

    world.write_config(
        &n1,
        &NodeOptions {
            outbound_unknown: Some("refuse"),
            ..Default::default()
        },
    )?;
    a1.kill9();
    let a1 = world.start_agent(&n1)?;
    let d = dial(client.command(testapp()), to, "old")?;
    assert!(!d.ok, "{d:?}");
    let line = a1.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("route").as_deref(), Some("refused"));
    Ok(())
}

/// A mesh destination on the same node is delivered directly (no TLS hop) and sees the client's
/// address.
#[test]
fn same_node_destinations_are_delivered_directly() -> Result<()> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, false)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n1, "server", 11, "shop", "cart")?;
    world.write_workloads(&n1, &[&client, &server])?;
    let a1 = world.start_agent(&n1)?;
    a1.wait_for(
        |l| l.msg() == "pod enrolled" && l.field("pod").as_deref() == Some("shop/server"),
        Duration::from_secs(5),
    )?;
    let mut srv = server.command(testapp());
    srv.args(["serve", "--listen", "0.0.0.0:8080", "--tag", "cart"]);
    let p = world.spawn(srv, "cart")?;
    p.wait_for_output("listening", Duration::from_secs(5))?;
    let to = SocketAddr::new(IpAddr::V4(server.ip4), 8080);
    let d = dial(client.command(testapp()), to, "near")?;
    assert!(d.ok && d.echo == "near", "{d:?}");
    assert_eq!(
        d.greeting_field("peer")
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
        Some(IpAddr::V4(client.ip4))
    );
    let line = a1.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("route").as_deref(), Some("same-node"));
    assert_eq!(
        line.field("peer_identity").as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
    Ok(())
}
