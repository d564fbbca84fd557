//! The local two-node demo: a test world with two nodes, three pods and two agents; traffic that is
//! carried, traffic that is refused, and what the agents logged about it.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use ferry_e2e::{NodeOptions, Sniffer, World, contains, dial};

use crate::Bins;

pub fn run(bins: &Bins) -> Result<()> {
    // SAFETY: single-threaded at this point; the test world reads these to find the binaries.
    unsafe {
        std::env::set_var("FERRY_BIN", &bins.ferry);
        std::env::set_var("FERRY_TESTAPP", &bins.testapp);
    }
    let mut world = World::new()?;
    println!("== Ferry demo: two nodes, three pods, one agent per node ==\n");
    let n1 = world.add_node("node1", 1, true)?;
    let n2 = world.add_node("node2", 2, true)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
    let other = world.add_pod_as(&n2, "other", 21, "lab", "default")?;
    // node1 refuses destinations outside the mesh; inbound plaintext is strict on node2.
    world.write_config(
        &n1,
        &NodeOptions {
            outbound_unknown: Some("refuse"),
            ..Default::default()
        },
    )?;
    world.write_config(
        &n2,
        &NodeOptions {
            inbound: Some("strict"),
            ..Default::default()
        },
    )?;
    let pods = [&client, &server, &other];
    for n in [&n1, &n2] {
        world.write_workloads(n, &pods)?;
    }
    for p in pods {
        println!("pod {:<14} on {}  {} / {}", p.key(), p.node, p.ip4, p.ip6);
    }
    let a1 = world.start_agent(&n1)?;
    let a2 = world.start_agent(&n2)?;
    for a in [&a1, &a2] {
        a.wait_for(|l| l.msg() == "ready", Duration::from_secs(10))?;
    }
    println!(
        "\nagents ready on node1 (pid {}) and node2 (pid {})\n",
        a1.pid, a2.pid
    );

    let mut srv = server.command(&bins.testapp);
    srv.args(["serve", "--listen", "0.0.0.0:8080", "--tag", "cart"]);
    let app = world.spawn(srv, "cart")?;
    app.wait_for_output("listening", Duration::from_secs(5))?;

    let show = |what: &str, d: &ferry_e2e::Dial| {
        if d.ok {
            println!(
                "  {what}: ok, app answered {:?}, echo {:?}",
                d.greeting, d.echo
            );
        } else {
            println!("  {what}: refused ({})", d.error);
        }
    };
    println!(
        "1. shop/client (node1) -> shop/server:8080 (node2), the app dials the pod IP as usual;"
    );
    println!(
        "   the agents carry it over mutual TLS (HBONE); the server app sees the client pod's IP"
    );
    let to = SocketAddr::new(server.ip4.into(), 8080);
    let sniffer = Sniffer::start(&n1.netns, "fab0")?;
    let d = dial(client.command(&bins.testapp), to, "GET /cart secret=42")?;
    let frames = sniffer.stop()?;
    show("client -> server", &d);
    let clear = if contains(&frames, b"secret=42") {
        "SEEN (a bug!)"
    } else {
        "not seen"
    };
    println!(
        "  node1's link to node2 carried {} bytes; the request text in clear: {clear}",
        frames.len()
    );
    println!(
        "2. shop/client -> 203.0.113.7:443, outside the mesh (node1 refuses such destinations)"
    );
    show(
        "client -> 203.0.113.7",
        &dial(
            client.command(&bins.testapp),
            "203.0.113.7:443".parse()?,
            "x",
        )?,
    );
    println!(
        "3. plaintext from node1's host network straight to shop/server:8080 (node2 is strict)"
    );
    show(
        "node1 -> server",
        &dial(n1.command(&bins.testapp), to, "x")?,
    );

    std::thread::sleep(Duration::from_millis(300));
    for (name, a) in [("node1", &a1), ("node2", &a2)] {
        println!("\naccess log of the agent on {name}:");
        for l in a.access_lines() {
            println!(
                "  {:<8} {:<12} {} -> {}  {:<10} {:<8} {} {}",
                l.field("direction").unwrap_or_default(),
                l.field("pod").unwrap_or_default(),
                l.field("src").unwrap_or_default(),
                l.field("dst").unwrap_or_default(),
                l.field("route").unwrap_or_default(),
                l.field("result").unwrap_or_default(),
                l.field("peer_identity")
                    .map(|p| format!("peer={p}"))
                    .filter(|p| p != "peer=")
                    .unwrap_or_default(),
                l.field("reason").unwrap_or_default(),
            );
        }
    }
    println!("\nthe test world is removed now.");
    Ok(())
}
