//! Operating the agent: the CLI over the admin socket, /metrics, readiness, graceful shutdown.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use ferry_e2e::{NodeOptions, World, dial, metric_sum, testapp};

#[test]
fn cli_metrics_and_readiness_against_a_running_agent() -> Result<()> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, true)?;
    let n2 = world.add_node("n2", 2, true)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
    for n in [&n1, &n2] {
        world.write_workloads(n, &[&client, &server])?;
    }
    // Not running yet: one clear line naming the socket.
    let err = n1.cli(&["status"]).unwrap_err().to_string();
    assert!(
        err.contains(&n1.admin_socket().display().to_string()) && err.contains("ferry run"),
        "{err}"
    );

    let a1 = world.start_agent(&n1)?;
    let _a2 = world.start_agent(&n2)?;
    assert_eq!(n1.http_get("/readyz")?.0, 200);
    assert_eq!(n1.http_get("/healthz")?.0, 200);

    let _app = world.serve(server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let h = world.hold(
        client.command(testapp()),
        SocketAddr::new(IpAddr::V4(server.ip4), 8080),
        4,
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let status = n1.cli(&["status"])?;
    assert_eq!(status["node"], "n1");
    assert_eq!(status["ready"], true);
    assert_eq!(status["enrolled_pods"], 1);
    assert_eq!(status["programs"].as_array().map(|a| a.len()), Some(7));
    assert!(
        status["programs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p.as_str().is_some_and(
                |p| p.starts_with("ferry_splice_verdict (off: disabled in the node config")
            ))),
        "the fast path is off by default and status says why: {status}"
    );
    assert!(
        status["soonest_cert_expiry"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    assert!(
        status["capture_counters"]["outbound_captured"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{status}"
    );

    let workloads = n1.cli(&["workloads"])?;
    let rows = workloads.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2);
    let c = rows
        .iter()
        .find(|r| r["name"] == "client")
        .cloned()
        .unwrap_or_default();
    assert_eq!(c["identity"], "spiffe://cluster.local/ns/shop/sa/frontend");
    assert_eq!(c["enrolled"], true);

    let conns = n1.cli(&["conns"])?;
    let live = conns.as_array().cloned().unwrap_or_default();
    assert_eq!(live.len(), 1, "{conns}");
    let conn = &live[0];
    assert_eq!(conn["direction"], "outbound");
    assert_eq!(conn["route"], "hbone");
    assert_eq!(conn["src_workload"], "shop/client");
    assert_eq!(conn["dst_workload"], "shop/server");
    assert_eq!(
        conn["src_identity"],
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert_eq!(
        conn["dst_identity"],
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    assert!(
        conn["bytes_sent"].as_u64().unwrap_or(0) >= 1,
        "bytes counted while the connection lives: {conn}"
    );

    let certs = n1.cli(&["certs"])?;
    assert!(
        certs.as_array().is_some_and(|a| a
            .iter()
            .any(|c| c["identity"] == "spiffe://cluster.local/ns/shop/sa/frontend")),
        "{certs}"
    );
    let dump = n1.cli(&["config", "dump"])?;
    assert_eq!(dump["node"], "n1");

    h.wait_for_output("\"ok\":true", Duration::from_secs(10))?;
    let to = SocketAddr::new(IpAddr::V4(server.ip4), 8080);
    let d = dial(client.command(testapp()), to, "metrics")?;
    assert!(d.ok, "{d:?}");
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = n1.http_get("/metrics")?;
    assert_eq!(code, 200);
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        metric_sum(&text, "istio_tcp_connections_opened_total", &labels),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "istio_tcp_connections_closed_total", &labels),
        2.0
    );
    // "received" is the request direction: "metrics" (7 bytes) plus the hold's one-byte rounds.
    assert!(
        metric_sum(&text, "istio_tcp_received_bytes_total", &labels) >= 7.0 + 40.0,
        "{text}"
    );
    assert!(
        metric_sum(
            &text,
            "ferry_tls_handshake_seconds_count",
            &[("direction", "outbound"), ("result", "ok")]
        ) >= 1.0
    );
    let (_, text2) = n2.http_get("/metrics")?;
    assert_eq!(
        metric_sum(
            &text2,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", "cluster.local/ns/shop/sa/frontend")
            ]
        ),
        2.0,
        "{text2}"
    );
    drop(a1);
    Ok(())
}

/// SIGTERM with a live transfer: the transfer finishes within the drain deadline, new connections are
/// refused meanwhile (capture stays fail-closed), and the agent exits.
#[test]
fn sigterm_lets_a_live_transfer_finish() -> Result<()> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, true)?;
    let n2 = world.add_node("n2", 2, true)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
    world.write_config(
        &n1,
        &NodeOptions {
            drain_deadline: Some("10s"),
            ..Default::default()
        },
    )?;
    for n in [&n1, &n2] {
        world.write_workloads(n, &[&client, &server])?;
    }
    let a1 = world.start_agent(&n1)?;
    let _a2 = world.start_agent(&n2)?;
    let _app = world.serve(server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let h = world.hold(
        client.command(testapp()),
        SocketAddr::new(IpAddr::V4(server.ip4), 8080),
        3,
    )?;
    assert_eq!(n1.http_get("/readyz")?.0, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a1.pid as i32),
        nix::sys::signal::SIGTERM,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let (code, body) = n1.http_get("/readyz")?;
    assert_eq!(code, 503, "not ready while draining: {body}");
    let to = SocketAddr::new(IpAddr::V4(server.ip4), 8080);
    let d = dial(client.command(testapp()), to, "new")?;
    assert!(!d.ok, "new connections are refused while draining: {d:?}");
    h.wait_for_output("\"ok\":", Duration::from_secs(10))?;
    assert!(
        h.output().contains("\"ok\":true"),
        "the live transfer finished: {}",
        h.output()
    );
    a1.wait_for(|l| l.msg() == "agent stopped", Duration::from_secs(10))?;
    let stopped = a1
        .lines()
        .into_iter()
        .find(|l| l.msg() == "agent stopped")
        .and_then(|l| l.field("unfinished"));
    assert_eq!(stopped.as_deref(), Some("0"));
    Ok(())
}
