//! The local two-node demo: a test world with two nodes, a client, a server and an intruder pod, one
//! agent per node; an allowed request crossing nodes over mutual TLS, a denied one and why, the CLI,
//! metrics. Everything is torn down at the end.
use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::Result;
use ferry_e2e::{Node, NodeOptions, Sniffer, World, contains, dial};

use crate::Bins;

const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

fn step(n: u32, text: &str) {
    println!("\n[{n}/6] {text}");
}

/// Runs the `ferry` CLI against a node's agent and prints its table output, indented.
fn cli(bins: &Bins, node: &Node, args: &[&str]) -> Result<()> {
    let out = Command::new(&bins.ferry)
        .args(args)
        .arg("--socket")
        .arg(node.admin_socket())
        .output()?;
    println!("  $ ferry {}   (on {})", args.join(" "), node.name);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("    {line}");
    }
    Ok(())
}

pub fn run(bins: &Bins) -> Result<()> {
    // SAFETY: single-threaded at this point; the test world reads these to find the binaries.
    unsafe {
        std::env::set_var("FERRY_BIN", &bins.ferry);
        std::env::set_var("FERRY_TESTAPP", &bins.testapp);
    }
    let started = std::time::Instant::now();
    println!("== Ferry demo: two nodes, one agent each, three pods ==");
    step(
        1,
        "building the test world (network namespaces, veth, bridges, cgroups, a CA)",
    );
    let mut world = World::new()?;
    let n1 = world.add_node("node1", 1, true)?;
    let n2 = world.add_node("node2", 2, true)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let intruder = world.add_pod_as(&n1, "intruder", 11, "lab", "default")?;
    let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
    world.write_config(&n1, &NodeOptions::default())?;
    world.write_config(
        &n2,
        &NodeOptions {
            inbound: Some("strict"),
            ..Default::default()
        },
    )?;
    let pods = [&client, &intruder, &server];
    for n in [&n1, &n2] {
        world.write_workloads(n, &pods)?;
        let text = std::fs::read_to_string(n.workloads_path())?.replace(
            "  - name: server\n",
            "  - name: server\n    labels: {app: cart}\n",
        );
        std::fs::write(n.workloads_path(), text)?;
    }
    n2.write_policy("cart.yaml", POLICY)?;
    for p in pods {
        println!(
            "  pod {:<14} on {}  {} / {}  sa={}",
            p.key(),
            p.node,
            p.ip4,
            p.ip6,
            p.service_account
        );
    }
    println!(
        "  node2's policy: only spiffe://cluster.local/ns/shop/sa/frontend may reach app=cart on 8080"
    );

    step(
        2,
        "starting the agents (eBPF capture attached, pods enrolled, certificates minted)",
    );
    let a1 = world.start_agent(&n1)?;
    let a2 = world.start_agent(&n2)?;
    println!("  node1 agent pid {}, node2 agent pid {}", a1.pid, a2.pid);
    let mut srv = server.command(&bins.testapp);
    srv.args(["serve", "--listen", "0.0.0.0:8080", "--tag", "cart"]);
    let app = world.spawn(srv, "cart")?;
    app.wait_for_output("listening", Duration::from_secs(5))?;

    step(
        3,
        "shop/client -> shop/server:8080: the app dials the pod IP, the agents carry it over mTLS (HBONE)",
    );
    let to = SocketAddr::new(server.ip4.into(), 8080);
    let sniffer = Sniffer::start(&n1.netns, "fab0")?;
    let d = dial(client.command(&bins.testapp), to, "GET /cart secret=42")?;
    let frames = sniffer.stop()?;
    if d.ok {
        println!(
            "  allowed: the server app answered {:?} and echoed {:?}",
            d.greeting, d.echo
        );
    } else {
        println!("  UNEXPECTED: refused ({})", d.error);
    }
    let clear = if contains(&frames, b"secret=42") {
        "SEEN (a bug!)"
    } else {
        "not seen"
    };
    println!(
        "  node1's link carried {} bytes; the request text in clear: {clear}",
        frames.len()
    );

    step(
        4,
        "lab/intruder -> shop/server:8080: denied by node2's agent",
    );
    let d = dial(intruder.command(&bins.testapp), to, "GET /cart")?;
    if d.ok {
        println!("  UNEXPECTED: allowed");
    } else {
        println!(
            "  refused: the intruder app got {}",
            if d.error.is_empty() {
                "no answer".into()
            } else {
                d.error.clone()
            }
        );
    }
    cli(
        bins,
        &n2,
        &[
            "explain",
            "--from",
            "lab/intruder",
            "--to",
            "shop/server:8080",
        ],
    )?;
    cli(
        bins,
        &n2,
        &[
            "explain",
            "--from",
            "shop/client",
            "--to",
            "shop/server:8080",
        ],
    )?;

    step(5, "a live connection, seen by the CLI");
    let mut hold = client.command(&bins.testapp);
    hold.args(["hold", "--to", &to.to_string(), "--seconds", "2"]);
    let h = world.spawn(hold, "hold")?;
    h.wait_for_output("connected", Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(500));
    cli(bins, &n1, &["conns"])?;
    cli(bins, &n2, &["status"])?;
    h.wait_for_output("\"ok\":", Duration::from_secs(10))?;

    step(
        6,
        "Prometheus metrics of node2 (Istio's TCP metrics and Ferry's own), an excerpt",
    );
    let (_, metrics) = n2.http_get("/metrics")?;
    for line in metrics.lines().filter(|l| {
        (l.starts_with("istio_tcp_connections_opened_total")
            || l.starts_with("ferry_policy_decisions_total"))
            && !l.ends_with(" 0")
    }) {
        println!("  {line}");
    }

    println!("\naccess log of node2's agent:");
    for l in a2.access_lines() {
        println!(
            "  {} {} -> {}  {} {}  {}",
            l.field("direction").unwrap_or_default(),
            l.field("src").unwrap_or_default(),
            l.field("dst").unwrap_or_default(),
            l.field("route").unwrap_or_default(),
            l.field("result").unwrap_or_default(),
            l.field("decision")
                .or_else(|| l.field("reason"))
                .unwrap_or_default(),
        );
    }
    drop(world);
    println!(
        "\nthe test world is removed; demo took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
