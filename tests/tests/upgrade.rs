//! Replacing a node's agent without dropping anything, and recovering from a killed one: real agents
//! in the test world, a successor started beside the running agent as a DaemonSet surge starts it.
//! Needs root.
use std::{
    ffi::OsStr,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ferry_e2e::{
    Agent, DENY_SHOP, LogLine, Node, NodeOptions, Pod, Proc, Sniffer, TwoNodes, World, contains,
    dial, ebpf_variant_object, load_bin, testapp,
};

const APP_PORT: u16 = 8080;

/// One test of this file at a time: each runs four agents and 50 transfers, and the timing bounds
/// (2 s to resume after kill -9) should not measure another test's load — nor the minute-long build of
/// the variant eBPF object on a fresh target directory.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisons it; the next one may still run.
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
/// Long-lived transfers kept running through each replacement.
const LONG_LIVED: usize = 50;

fn two_nodes() -> Result<TwoNodes> {
    // Long enough that the transfers a replaced agent keeps serving end before it cuts them.
    let opts = NodeOptions {
        drain_deadline: Some("60s"),
        ..Default::default()
    };
    TwoNodes::start(&opts, &opts)
}

/// The node's config for a second agent beside the running one: the same except the admin HTTP
/// port, which both would otherwise bind in the node's netns (on Kubernetes each pod has its own IP).
fn successor_config(node: &Node) -> Result<PathBuf> {
    let text = std::fs::read_to_string(node.config_path())?;
    let next = text.replace(
        "admin: {socket: admin.sock}",
        "admin: {socket: admin.sock, http: 127.0.0.1:15021}",
    );
    if next == text {
        bail!("the test world's config no longer has the admin line this test rewrites");
    }
    let path = node.dir.join("node-next.yaml");
    std::fs::write(&path, next)?;
    Ok(path)
}

/// Starts a successor beside `old` (`ferry run` with `args`) and checks the handoff happened on both
/// sides.
fn replace(world: &World, node: &Node, old: &Agent, pods: usize, args: &[&OsStr]) -> Result<Agent> {
    let new = world.start_agent_with(node, &successor_config(node)?, args)?;
    let took = new.wait_for(
        |l| l.msg() == "took over from the running agent",
        Duration::from_secs(5),
    )?;
    assert_eq!(took.field("pods"), Some(pods.to_string()), "{}", took.0);
    // Ready (what the kubelet's probe and the rollout wait for) only once the listeners are taken.
    let order: Vec<String> = new.lines().iter().map(|l| l.msg().to_owned()).collect();
    let took_at = order
        .iter()
        .position(|m| m == "took over from the running agent");
    let ready_at = order.iter().position(|m| m == "ready");
    assert!(took_at < ready_at, "ready before the handoff: {order:?}");
    old.wait_for(
        |l| l.msg() == "handed over to the new agent; no longer accepting",
        Duration::from_secs(5),
    )?;
    Ok(new)
}

#[derive(Debug, serde::Deserialize)]
struct LoadReport {
    long_ok: u64,
    long_broken: u64,
    long_bytes: u64,
    new_ok: u64,
    new_failed: u64,
    seconds: f64,
    errors: Vec<String>,
}

struct Load {
    proc: Proc,
    stop_file: PathBuf,
}

fn start_load(world: &World, client: &Pod, server: &Pod) -> Result<Load> {
    let stop_file = world.dir.join("load.stop");
    let mut cmd = client.command(load_bin());
    cmd.args([
        "--to",
        &SocketAddr::new(IpAddr::V4(server.ip4), APP_PORT).to_string(),
        "--long",
        &LONG_LIVED.to_string(),
        "--churn-ms",
        "10",
        "--max-seconds",
        "60",
        "--stop-file",
    ])
    .arg(&stop_file);
    let proc = world.spawn(cmd, "load")?;
    proc.wait_for_output("started", Duration::from_secs(15))?;
    Ok(Load { proc, stop_file })
}

impl Load {
    fn finish(self) -> Result<LoadReport> {
        std::fs::write(&self.stop_file, "")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.proc.output();
            if let Some(line) = out.lines().find(|l| l.starts_with('{')) {
                return serde_json::from_str(line).with_context(|| format!("parsing {line:?}"));
            }
            if Instant::now() > deadline {
                bail!("the load did not report: {out}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn routed(lines: &[LogLine], route: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.is_access() && l.field("route").as_deref() == Some(route))
        .count()
}

/// Replaces the client's node agent and then the server's while 50 long-lived transfers run and new
/// connections open every 10 ms: nothing fails, every byte comes back intact, the old agents finish
/// the transfers they carry and the new ones carry every connection opened after them.
#[test]
fn upgrade_under_load_drops_nothing() -> Result<()> {
    let _serial = serial();
    let t = two_nodes()?;
    let app = t.world.serve(
        t.server.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "cart",
    )?;
    let load = start_load(&t.world, &t.client, &t.server)?;
    std::thread::sleep(Duration::from_millis(800));
    let b1 = replace(&t.world, &t.n1, &t.a1, 1, &[])?;
    std::thread::sleep(Duration::from_millis(1200));
    let b2 = replace(&t.world, &t.n2, &t.a2, 1, &[])?;
    std::thread::sleep(Duration::from_millis(1200));
    let report = load.finish()?;
    eprintln!(
        "upgrade under load: {} s, {} new connections, {} long-lived transfers, {} bytes echoed",
        report.seconds, report.new_ok, report.long_ok, report.long_bytes
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.new_failed, 0, "failed new connections: {report:?}");
    assert_eq!(report.long_broken, 0, "broken transfers: {report:?}");
    assert_eq!(report.long_ok, LONG_LIVED as u64, "{report:?}");
    assert!(
        report.new_ok >= 50,
        "too few new connections to mean anything: {report:?}"
    );
    assert!(report.long_bytes > 0, "{report:?}");

    // Who carried what: the old client-side agent finished the long-lived transfers (each logs at
    // close), the new ones carried the connections opened after them.
    let closed_by_old = || routed(&t.a1.lines(), "hbone");
    assert!(
        ferry_e2e::eventually(Duration::from_secs(5), || closed_by_old() >= LONG_LIVED),
        "the old agent logged {} carried connections",
        closed_by_old()
    );
    assert!(
        routed(&b1.lines(), "hbone") > 0,
        "the new client-side agent carried nothing"
    );
    assert!(
        routed(&b2.lines(), "hbone") > 0,
        "the new server-side agent carried nothing"
    );
    assert!(app.is_running());

    // The old agents drained (nothing left) and wait for the kubelet's SIGTERM; the new ones serve.
    for old in [&t.a1, &t.a2] {
        old.wait_for(
            |l| l.msg() == "agent stopped" && l.field("unfinished").as_deref() == Some("0"),
            Duration::from_secs(5),
        )?;
        assert!(
            old.terminate(Duration::from_secs(5)),
            "an old agent ignored SIGTERM"
        );
    }
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.client.command(testapp()), to, "after")?;
    assert!(d.ok && d.echo == "after", "{d:?}");
    Ok(())
}

/// kill -9 of the client's node agent: connections in the gap are refused and none of their bytes
/// crosses the node link in clear; a new agent serves again within 2 s of starting.
#[test]
fn killed_agent_fails_closed_and_a_new_one_serves_within_2s() -> Result<()> {
    let _serial = serial();
    let t = two_nodes()?;
    let app = t.world.serve(
        t.server.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "cart",
    )?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.client.command(testapp()), to, "before")?;
    assert!(d.ok, "{d:?}");
    let accepted_before = app.output().matches("accepted").count();

    t.a1.kill9();
    let marker = format!("FERRY-GAP-{}", std::process::id());
    let sniffer = Sniffer::start(&t.n1.netns, "fab0")?;
    for _ in 0..5 {
        let d = dial(t.client.command(testapp()), to, &marker)?;
        assert!(
            !d.ok && !d.connected,
            "a connection got through without an agent: {d:?}"
        );
        assert!(
            d.error.contains("refused"),
            "refused at once, not timed out: {d:?}"
        );
    }
    let frames = sniffer.stop()?;
    assert!(
        !contains(&frames, marker.as_bytes()),
        "bytes of the gap crossed the node link in clear"
    );
    assert_eq!(
        app.output().matches("accepted").count(),
        accepted_before,
        "the app saw a connection during the gap"
    );

    // The killed agent left its handoff socket file: nobody answers, so the new agent starts fresh.
    assert!(t.n1.dir.join("handoff.sock").exists());
    let started = Instant::now();
    let b1 = t.world.spawn_agent(&t.n1, &t.n1.config_path(), &[])?;
    let mut resumed = None;
    while started.elapsed() < Duration::from_secs(10) {
        let d = dial(t.client.command(testapp()), to, "again")?;
        if d.ok && d.echo == "again" {
            resumed = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let resumed = resumed.context("service did not resume within 10 s")?;
    eprintln!("kill -9: service resumed {resumed:?} after the new agent started");
    assert!(
        resumed < Duration::from_secs(2),
        "service resumed only after {resumed:?}"
    );
    let attached = b1.wait_for(|l| l.msg() == "capture attached", Duration::from_secs(1))?;
    assert_eq!(attached.field("reopened").as_deref(), Some("true"));
    assert!(
        b1.lines()
            .iter()
            .all(|l| l.msg() != "listeners received from the running agent"),
        "a dead agent cannot hand anything over"
    );
    Ok(())
}

/// Same-node connections the old agent joined in the kernel (the fast path) stay joined through a
/// handoff: the successor attaches its verdict program to the same pinned maps and leaves the old
/// agent's pairs in place while the old agent drains them, so their bytes keep flowing intact.
#[test]
fn upgrade_keeps_same_node_fast_path_connections_joined() -> Result<()> {
    let _serial = serial();
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, false)?;
    let opts = NodeOptions {
        drain_deadline: Some("60s"),
        extra: "capture: {fast_path: true}\n".into(),
        ..Default::default()
    };
    world.write_config(&n1, &opts)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n1, "server", 20, "shop", "cart")?;
    world.write_workloads(&n1, &[&client, &server])?;
    let a1 = world.start_agent(&n1)?;
    let _app = world.serve(
        server.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "cart",
    )?;
    let load = start_load(&world, &client, &server)?;
    let redirected = || counter(&n1, "splice_redirected").unwrap_or(0);
    assert!(
        ferry_e2e::eventually(Duration::from_secs(5), || redirected() > 0),
        "the old agent joined no connection in the kernel"
    );
    let _b1 = replace(&world, &n1, &a1, 2, &[])?;
    let after_handoff = redirected();
    assert!(
        ferry_e2e::eventually(Duration::from_secs(3), || redirected()
            > after_handoff + 100),
        "the old agent's joined connections left the kernel after the handoff ({after_handoff} buffers)"
    );
    let report = load.finish()?;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.new_failed, 0, "failed new connections: {report:?}");
    assert_eq!(report.long_broken, 0, "broken transfers: {report:?}");
    assert_eq!(report.long_ok, LONG_LIVED as u64, "{report:?}");
    eprintln!(
        "fast path through a handoff: {} buffers redirected, {} passed to userspace, {report:?}",
        redirected(),
        counter(&n1, "splice_passed")?
    );
    Ok(())
}

/// A replaced agent still draining keeps its connections under policy: a reload that denies one
/// closes it there, as a running agent would — the successor never sees those connections.
#[test]
fn a_draining_agent_closes_the_connections_a_policy_reload_denies() -> Result<()> {
    let _serial = serial();
    let t = two_nodes()?;
    let _app = t.world.serve(
        t.server.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "cart",
    )?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let hold = t.world.hold(t.client.command(testapp()), to, 30)?;
    // The destination node enforces policy; its old agent keeps the held connection while draining
    // (60 s deadline, longer than this test).
    let b2 = replace(&t.world, &t.n2, &t.a2, 1, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !hold.output().contains("\"ok\":"),
        "the held connection ended with the handoff: {}",
        hold.output()
    );

    t.n2.write_policy("deny.yaml", DENY_SHOP)?;
    t.a2.wait_for(
        |l| l.msg() == "live connection closed: the new policies deny it",
        Duration::from_secs(5),
    )?;
    hold.wait_for_output("\"ok\":false", Duration::from_secs(5))?;
    // With its last connection closed the old agent is done draining, long before its deadline.
    t.a2.wait_for(
        |l| l.msg() == "agent stopped" && l.field("unfinished").as_deref() == Some("0"),
        Duration::from_secs(5),
    )?;
    // The successor applies the same set to new connections.
    b2.wait_for(|l| l.msg() == "policies reloaded", Duration::from_secs(5))?;
    let d = dial(t.client.command(testapp()), to, "x")?;
    assert!(!d.ok, "{d:?}");
    b2.wait_for(
        |l| {
            l.is_access()
                && l.field("reason")
                    .is_some_and(|r| r.contains("shop/deny-frontend"))
        },
        Duration::from_secs(5),
    )?;
    Ok(())
}

fn counter(node: &Node, name: &str) -> Result<u64> {
    let status = node.cli(&["status"])?;
    status["capture_counters"][name]
        .as_u64()
        .with_context(|| format!("no counter {name} in {status}"))
}

/// The programs of every pinned link a new agent found were replaced in place: the same link, another
/// program.
fn assert_programs_replaced(agent: &Agent, expected: &[&str]) {
    let lines = agent.lines();
    for name in expected {
        let line = lines
            .iter()
            .find(|l| {
                l.msg() == "program replaced by link update"
                    && l.field("program").as_deref() == Some(*name)
            })
            .unwrap_or_else(|| panic!("{name}: no link update logged by the new agent"));
        assert!(line.field("link_id").is_some(), "{}", line.0);
        assert_ne!(
            line.field("from_program_id"),
            line.field("to_program_id"),
            "{}",
            line.0
        );
    }
}

/// The same load while both agents are replaced by agents running a different eBPF object (its
/// counters advance by 2): the pinned links switch to the new programs atomically (nothing fails or
/// breaks), and those programs work on the maps the old ones filled — the listeners the old agent
/// registered steer inbound connections, and the counters go on from the old values, now by 2.
#[test]
fn upgrade_to_a_different_ebpf_object_under_load() -> Result<()> {
    let _serial = serial();
    let variant = ebpf_variant_object()?;
    let t = two_nodes()?;
    let _app = t.world.serve(
        t.server.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "cart",
    )?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), APP_PORT);
    let d = dial(t.client.command(testapp()), to, "before")?;
    assert!(d.ok, "{d:?}");
    let captured_before = counter(&t.n1, "outbound_captured")?;
    let delivered_before = counter(&t.n2, "inbound_delivery_passed")?;
    assert!(captured_before >= 1 && delivered_before >= 1);

    let load = start_load(&t.world, &t.client, &t.server)?;
    std::thread::sleep(Duration::from_millis(800));
    let args = [OsStr::new("--ebpf-object"), variant.as_os_str()];
    let b1 = replace(&t.world, &t.n1, &t.a1, 1, &args)?;
    std::thread::sleep(Duration::from_millis(1200));
    let b2 = replace(&t.world, &t.n2, &t.a2, 1, &args)?;
    std::thread::sleep(Duration::from_millis(1200));
    let report = load.finish()?;
    eprintln!(
        "upgrade to another eBPF object under load: {} s, {} new connections, {} long-lived transfers, {} bytes echoed",
        report.seconds, report.new_ok, report.long_ok, report.long_bytes
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.new_failed, 0, "{report:?}");
    assert_eq!(report.long_broken, 0, "{report:?}");
    assert_eq!(report.long_ok, LONG_LIVED as u64, "{report:?}");

    assert_programs_replaced(
        &b1,
        &[
            "ferry_connect4",
            "ferry_connect6",
            "ferry_getpeername4",
            "ferry_getpeername6",
            "ferry_sockops_established",
            "ferry_sk_lookup",
        ],
    );
    assert_programs_replaced(&b2, &["ferry_connect4", "ferry_sk_lookup"]);

    // Quiet now: each new connection moves the counters by exactly 2 (the variant's step), from where
    // the old programs left them.
    let (c0, d0) = (
        counter(&t.n1, "outbound_captured")?,
        counter(&t.n2, "inbound_delivery_passed")?,
    );
    assert!(c0 > captured_before && d0 > delivered_before);
    const DIALS: u64 = 3;
    for i in 0..DIALS {
        let d = dial(t.client.command(testapp()), to, &format!("after{i}"))?;
        assert!(d.ok, "{d:?}");
    }
    assert_eq!(counter(&t.n1, "outbound_captured")? - c0, 2 * DIALS);
    assert_eq!(counter(&t.n2, "inbound_delivery_passed")? - d0, 2 * DIALS);
    Ok(())
}
