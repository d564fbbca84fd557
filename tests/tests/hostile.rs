//! Slow and hostile peers on port 15008, and apps that misbehave behind the tunnel: the agent bounds the
//! time and memory each may take, counts them in its metrics, and keeps serving everyone else. Real
//! agents in a two-node test world; the hostile peer is `tests/hbone/hostile.py` (PyPI `h2` + Python's
//! `ssl`), which shares no code with Ferry. Needs root.
use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use ferry_e2e::{
    Node, NodeOptions, Proc, TRUST_DOMAIN, TwoNodes, dial, eventually, run_with_timeout, testapp,
};

const APP_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
/// Small limits, so that the tests reach them quickly.
const LIMITS: &str = "hbone:\n  handshake_timeout: 3s\n  max_pending_handshakes: 512\n  max_pending_handshakes_per_peer: 100\n  request_timeout: 2s\n  max_header_list_size: 4096\n";

/// n1 with a client pod, n2 with a server pod running the echo app on :8080; n2's agent has `LIMITS`.
struct Two {
    t: TwoNodes,
    _app: Proc,
}

impl std::ops::Deref for Two {
    type Target = TwoNodes;
    fn deref(&self) -> &TwoNodes {
        &self.t
    }
}

fn two() -> Result<Two> {
    let limits = NodeOptions {
        extra: LIMITS.into(),
        ..NodeOptions::default()
    };
    let t = TwoNodes::start(&NodeOptions::default(), &limits)?;
    let app = t.world.serve(
        t.server.command(testapp()),
        &format!("0.0.0.0:{APP_PORT}"),
        "cart",
    )?;
    Ok(Two { t, _app: app })
}

fn hostile_py() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hbone/hostile.py")
}

fn hostile(mut cmd: Command, args: &[&str]) -> Command {
    cmd.arg(hostile_py()).args(args);
    cmd
}

fn last_json(out: &str) -> Result<serde_json::Value> {
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("parsing {out:?}"))
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn refused(node: &Node, reason: &str) -> Result<f64> {
    node.metric("ferry_hbone_refused_total", &[("reason", reason)])
}

fn sock(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// 1,000 connections to the server pod's :15008 that start a TLS handshake and never finish it: past
/// the per-peer bound they are closed at once, the rest when the handshake timeout ends them; all are
/// counted, the agent's memory stays bounded, and a mesh client gets through the whole time.
#[test]
fn a_thousand_unfinished_handshakes_are_bounded_while_others_get_through() -> Result<()> {
    let t = two()?;
    let target = sock(t.server.ip4, APP_PORT);
    let d = dial(t.client.command(testapp()), target, "before")?;
    assert!(d.ok && d.echo == "before", "{d:?}");
    let rss_before = rss_kib(t.a2.pid)?;

    let hbone = sock(t.server.ip4, HBONE_PORT).to_string();
    let attack = t.world.spawn(
        hostile(
            t.n1.command("python3"),
            &[
                "handshakes",
                "--connect",
                &hbone,
                "--count",
                "1000",
                "--hold",
                "20",
            ],
        ),
        "handshakes",
    )?;
    attack.wait_for_output("OPENED", Duration::from_secs(20))?;
    let pending = t.n2.metric("ferry_hbone_pending_handshakes", &[])?;
    let rss_during = rss_kib(t.a2.pid)?;
    // Meanwhile a mesh connection (another source address) completes its handshake and its bytes.
    let d = dial(t.client.command(testapp()), target, "during")?;
    assert!(d.ok && d.echo == "during", "{d:?}");
    assert!(
        pending <= 100.0,
        "pending handshakes from one peer are bounded by the per-peer limit: {pending}"
    );

    ensure!(
        eventually(Duration::from_secs(25), || !attack.is_running()),
        "the hostile peer did not finish: {}",
        attack.output()
    );
    let r = last_json(&attack.output())?;
    let closed = r["closed_ms"].as_array().context("closed_ms")?;
    assert_eq!(r["still_open"], 0, "the agent closed every one: {r}");
    assert_eq!(closed.len(), 1000, "{r}");
    let overloaded = refused(&t.n2, "overloaded")?;
    let timed_out = refused(&t.n2, "timeout")?;
    assert_eq!(
        overloaded + timed_out,
        1000.0,
        "each refused connection is counted once (overloaded {overloaded}, timeout {timed_out})"
    );
    assert!(overloaded >= 800.0, "overloaded {overloaded}");
    assert!(timed_out >= 100.0, "timeout {timed_out}");
    let last_close = closed.iter().filter_map(|v| v.as_u64()).max().unwrap_or(0);
    assert!(
        last_close < 3000 + r["opened_ms"].as_u64().unwrap_or(0) + 2000,
        "the last one closed by the 3 s handshake timeout: {r}"
    );
    assert_eq!(t.n2.metric("ferry_hbone_pending_handshakes", &[])?, 0.0);
    let grown = rss_during.saturating_sub(rss_before);
    eprintln!(
        "server agent RSS: {rss_before} KiB before, {rss_during} KiB with 1,000 unfinished handshakes (+{grown} KiB); overloaded {overloaded}, timeout {timed_out}, opened in {} ms",
        r["opened_ms"]
    );
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    let d = dial(t.client.command(testapp()), target, "after")?;
    assert!(d.ok && d.echo == "after", "{d:?}");
    let _ = (&t.a1, &t.n2);
    Ok(())
}

/// A verified peer that finishes TLS and the HTTP/2 preface but never sends a CONNECT is closed after
/// the request timeout; a CONNECT over the header limit gets 431 while its connection goes on; one far
/// over it ends that connection only. All while a mesh client is served.
#[test]
fn peers_that_never_ask_and_oversized_headers_are_bounded() -> Result<()> {
    require_python_h2()?;
    let t = two()?;
    let target = sock(t.server.ip4, APP_PORT).to_string();
    let hbone = sock(t.server.ip4, HBONE_PORT).to_string();
    let id = format!("spiffe://{TRUST_DOMAIN}/ns/ext/sa/peer");
    let certs = t.world.issue_workload(&t.n1, &id, "ext-peer")?;
    let path = |f: &str| certs.join(f).display().to_string();
    let tls = [
        "--cert".to_owned(),
        path("cert.pem"),
        "--key".to_owned(),
        path("key.pem"),
        "--ca".to_owned(),
        path("bundle.pem"),
    ];
    let run = |args: &[&str]| -> Result<serde_json::Value> {
        let mut cmd = hostile(t.n1.command("python3"), args);
        cmd.args(&tls);
        last_json(&run_with_timeout(cmd, Duration::from_secs(30))?)
    };

    let r = run(&["no-request", "--connect", &hbone, "--hold", "10"])?;
    let elapsed = r["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(r["end"], "eof", "{r}");
    assert!(
        (1500..5000).contains(&elapsed),
        "closed by the 2 s request timeout: {r}"
    );
    assert_eq!(refused(&t.n2, "request_timeout")?, 1.0);

    let r = run(&[
        "big-header",
        "--connect",
        &hbone,
        "--target",
        &target,
        "--size",
        "6000",
    ])?;
    let first = r["first"].as_str().unwrap_or_default();
    // 431, or REFUSED_STREAM (7) when the reset overtakes the response.
    assert!(first == "431" || first == "reset:7", "{r}");
    assert_eq!(
        r["second"], "200",
        "the same connection serves the next CONNECT: {r}"
    );

    let r = run(&[
        "big-header",
        "--connect",
        &hbone,
        "--target",
        &target,
        "--size",
        "60000",
    ])?;
    // ENHANCE_YOUR_CALM (11): h2 ends a connection whose header block is past 4x the limit.
    assert_eq!(r["first"], "goaway:11", "{r}");

    let d = dial(t.client.command(testapp()), target.parse()?, "served")?;
    assert!(d.ok && d.echo == "served", "{d:?}");
    assert!(
        std::path::Path::new(&format!("/proc/{}", t.a2.pid)).exists(),
        "the agent is alive"
    );
    let _ = &t.a1;
    Ok(())
}

fn require_python_h2() -> Result<()> {
    let ok = Command::new("python3")
        .args(["-c", "import h2"])
        .status()
        .is_ok_and(|s| s.success());
    ensure!(ok, "Python's h2 is missing: run `cargo xtask setup`");
    Ok(())
}

/// A destination app that accepts and never reads: the sender is held back (its writes block) with a
/// bounded number of bytes in flight, and neither agent's memory grows with what the client tries to
/// send. Meanwhile other connections are served.
#[test]
fn an_app_that_never_reads_holds_the_sender_back() -> Result<()> {
    let t = two()?;
    const SINK: &str = r#"
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
held = []
while True:
    c, _ = s.accept(); held.append(c)
"#;
    const WRITER: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
s.settimeout(3)
chunk = b"x" * (1 << 20)
sent = 0
blocked = False
while sent < (1 << 30):
    try:
        n = s.send(chunk)
    except socket.timeout:
        blocked = True
        break
    sent += n
print(json.dumps({"sent": sent, "blocked": blocked}), flush=True)
time.sleep(float(sys.argv[2]))
"#;
    let port = 8081u16;
    let mut sink = t.server.command("python3");
    sink.args(["-c", SINK, &port.to_string()]);
    let sink = t.world.spawn(sink, "sink")?;
    sink.wait_for_output("listening", Duration::from_secs(5))?;
    let rss1 = rss_kib(t.a1.pid)?;
    let rss2 = rss_kib(t.a2.pid)?;
    let mut w = t.client.command("python3");
    w.args(["-c", WRITER, &sock(t.server.ip4, port).to_string(), "8"]);
    let writer = t.world.spawn(w, "writer")?;
    writer.wait_for_output("blocked", Duration::from_secs(60))?;
    let r = last_json(&writer.output())?;
    let (grow1, grow2) = (
        rss_kib(t.a1.pid)?.saturating_sub(rss1),
        rss_kib(t.a2.pid)?.saturating_sub(rss2),
    );
    let sent = r["sent"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "never-reading app: {sent} bytes accepted before the sender blocked; agent RSS +{grow1} KiB (client side), +{grow2} KiB (server side)"
    );
    assert_eq!(r["blocked"], true, "the sender was held back: {r}");
    // Socket buffers on four sockets plus one stream's HTTP/2 window; nowhere near the 1 GiB offered.
    assert!(sent < 64 << 20, "{sent} bytes in flight");
    assert!(grow1 < 16 * 1024, "client-side agent grew {grow1} KiB");
    assert!(grow2 < 16 * 1024, "server-side agent grew {grow2} KiB");
    let d = dial(
        t.client.command(testapp()),
        sock(t.server.ip4, APP_PORT),
        "beside",
    )?;
    assert!(d.ok && d.echo == "beside", "{d:?}");
    let _ = (&t.n1, &t.n2);
    Ok(())
}

/// A client that resets its connection mid-transfer, and a destination app that closes half-way
/// through what the client sends: each end learns promptly, both agents log the connection, and
/// the next connection is served.
#[test]
fn resets_and_early_closes_mid_stream_end_promptly() -> Result<()> {
    let t = two()?;
    const EARLY_CLOSE: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    got = 0
    while got < 100000:
        b = c.recv(65536)
        if not b:
            break
        got += len(b)
    c.sendall(b"enough\n")
    c.close()
    print("closed after", got, flush=True)
"#;
    const CLIENT: &str = r#"
import json, socket, struct, sys, time
host, port = sys.argv[1].rsplit(":", 1)
mode = sys.argv[2]
s = socket.create_connection((host, int(port)), timeout=10)
start = time.monotonic()
out = {"mode": mode}
if mode == "reset":
    s.sendall(b"y" * 200000)
    time.sleep(0.5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    out["end"] = "reset-sent"
else:
    chunk = b"z" * 65536
    got = b""
    try:
        for _ in range(4096):
            s.sendall(chunk)
    except OSError as e:
        out["send_error"] = type(e).__name__
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        out["end"] = "eof"
    except OSError as e:
        out["end"] = type(e).__name__
    out["received"] = got.decode("utf-8", "replace")
out["elapsed_ms"] = int((time.monotonic() - start) * 1000)
print(json.dumps(out), flush=True)
"#;
    let port = 8082u16;
    let mut app = t.server.command("python3");
    app.args(["-c", EARLY_CLOSE, &port.to_string()]);
    let app = t.world.spawn(app, "early-close")?;
    app.wait_for_output("listening", Duration::from_secs(5))?;
    let to = sock(t.server.ip4, port).to_string();

    // The app closes after 100 kB of the 256 MiB the client sends.
    let mut c = t.client.command("python3");
    c.args(["-c", CLIENT, &to, "early-close"]);
    let r = last_json(&run_with_timeout(c, Duration::from_secs(30))?)?;
    eprintln!("app closing half-way: {r}");
    assert!(
        r["send_error"].is_string(),
        "the client's sending was cut: {r}"
    );
    assert!(
        r["elapsed_ms"].as_u64().unwrap_or(u64::MAX) < 10_000,
        "promptly: {r}"
    );
    app.wait_for_output("closed after", Duration::from_secs(5))?;

    // The client resets its connection after 200 kB: the app's end is closed promptly.
    let mut c = t.client.command("python3");
    c.args(["-c", CLIENT, &to, "reset"]);
    let r = last_json(&run_with_timeout(c, Duration::from_secs(30))?)?;
    assert_eq!(r["end"], "reset-sent", "{r}");
    ensure!(
        eventually(Duration::from_secs(5), || {
            app.output().matches("closed after").count() >= 2
        }),
        "the app did not see the reset connection end: {}",
        app.output()
    );
    let dst = to.clone();
    for a in [&t.a1, &t.a2] {
        ensure!(
            eventually(Duration::from_secs(5), || {
                a.access_lines()
                    .iter()
                    .filter(|l| l.field("dst").as_deref() == Some(dst.as_str()))
                    .count()
                    >= 2
            }),
            "{}: an access line for each connection",
            a.node
        );
    }
    let d = dial(
        t.client.command(testapp()),
        sock(t.server.ip4, APP_PORT),
        "next",
    )?;
    assert!(d.ok && d.echo == "next", "{d:?}");
    let _ = (&t.n1, &t.n2);
    Ok(())
}

/// Bad input from the node's own files: a broken workloads file is reported and counted, the last good
/// one stays in force and traffic keeps flowing; a node config with a bad limit stops `ferry run` at
/// once with an error naming the file and the field, before anything is attached.
#[test]
fn a_bad_workloads_file_keeps_the_last_good_one_and_a_bad_node_config_is_named() -> Result<()> {
    let t = two()?;
    let target = sock(t.server.ip4, APP_PORT);
    std::fs::write(
        t.n2.workloads_path(),
        "workloads:\n  - name: Server_Pod\n    ips: [not-an-ip]\n",
    )?;
    t.a2.wait_for(
        |l| l.msg() == "workloads file rejected; keeping the last good one",
        Duration::from_secs(10),
    )?;
    let errors = t.n2.metric(
        "ferry_config_reloads_total",
        &[("config", "workloads"), ("result", "error")],
    )?;
    assert_eq!(errors, 1.0);
    let d = dial(t.client.command(testapp()), target, "kept")?;
    assert!(d.ok && d.echo == "kept", "{d:?}");

    let bad = t.world.dir.join("bad-node.yaml");
    std::fs::write(
        &bad,
        "node: n9\nworkloads: w.yaml\nhbone:\n  max_pending_handshakes: 8\n  max_pending_handshakes_per_peer: 9\n",
    )?;
    let out = Command::new(ferry_e2e::ferry_bin())
        .arg("run")
        .arg("--config")
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ferry run accepted a bad config");
    assert!(
        err.contains(&bad.display().to_string())
            && err.contains("hbone.max_pending_handshakes_per_peer"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = (&t.a1, &t.n1, &t.server);
    Ok(())
}
