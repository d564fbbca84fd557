//! The same-node fast path: an authorized same-node connection's two agent sockets joined in the
//! kernel (sockhash + sk_skb verdict). Bytes, half-close, byte counts, policy changes and the fallback
//! to userspace, on the real datapath. Needs root.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use ferry_e2e::{
    Agent, DENY_SHOP, Node, NodeOptions, PinnedU64Map, Pod, Proc, World, dial, eventually,
    run_with_timeout, testapp,
};

struct SameNode {
    world: World,
    n1: Node,
    client: Pod,
    server: Pod,
    agent: Agent,
}

/// The fast path is off by default (see `CaptureConfig::fast_path`); these tests switch it on.
const FAST_PATH_ON: &str = "capture: {fast_path: true}\n";

/// A capture event counter of the node's agent.
fn events(node: &Node, event: &str) -> Result<u64> {
    Ok(node.metric("ferry_capture_events_total", &[("event", event)])? as u64)
}

fn same_node(extra: &str) -> Result<SameNode> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, false)?;
    world.write_config(
        &n1,
        &NodeOptions {
            extra: extra.to_owned(),
            ..NodeOptions::default()
        },
    )?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n1, "server", 11, "shop", "cart")?;
    world.write_workloads(&n1, &[&client, &server])?;
    let agent = world.start_agent(&n1)?;
    agent.wait_for(
        |l| l.msg() == "pod enrolled" && l.field("pod").as_deref() == Some("shop/server"),
        Duration::from_secs(5),
    )?;
    Ok(SameNode {
        world,
        n1,
        client,
        server,
        agent,
    })
}

#[derive(Debug, serde::Deserialize)]
struct Bulk {
    ok: bool,
    #[serde(default)]
    received: usize,
    #[serde(default)]
    intact: bool,
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

/// Bytes intact both ways for 1 B, 64 KiB and 16 MiB with the client's half-close, and with the
/// app's (it sends first and finishes, the client still sends afterwards); the kernel carried them
/// (the verdict's counter moved, nothing fell back); the access log and the metrics count every byte.
#[test]
fn fast_path_carries_bytes_intact_with_half_close_and_counts_them() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    let _echo = t
        .world
        .serve(t.server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let mut srv = t.server.command(testapp());
    srv.args([
        "serve",
        "--listen",
        "0.0.0.0:8081",
        "--tag",
        "first",
        "--send-first",
        "65536",
        "--pause-ms",
        "30",
    ]);
    let first = t.world.spawn(srv, "first")?;
    first.wait_for_output("listening", Duration::from_secs(5))?;
    let before = events(&t.n1, "splice_redirected")?;
    let checked_before = events(&t.n1, "splice_checked")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8080);
    // The end of a large echo races the kernel's sender: several of them, each a byte apart so the
    // access lines tell them apart, make a close misreported as an error show up in most runs.
    let sizes = [
        1usize,
        64 * 1024,
        16 << 20,
        4 << 20,
        (4 << 20) + 1,
        (4 << 20) + 2,
        (4 << 20) + 3,
    ];
    for n in sizes {
        let b = bulk(t.client.command(testapp()), to, n, None)?;
        assert!(b.ok && b.intact && b.received == n, "{n} bytes: {b:?}");
    }
    // The server half-closes first, on a connection already joined (its pauses outlast the join
    // delay): its bare FIN goes through the verdict while the client still has everything to send.
    // Redirected, that FIN used to break the client's side with EPIPE before it sent a byte.
    let to_first = SocketAddr::new(IpAddr::V4(t.server.ip4), 8081);
    let first_before = events(&t.n1, "splice_redirected")?;
    let b = bulk(t.client.command(testapp()), to_first, 100_000, Some(65536))?;
    assert!(b.ok && b.intact, "{b:?}");
    first.wait_for_output("got 100000 intact=true", Duration::from_secs(10))?;
    assert!(
        events(&t.n1, "splice_redirected")? > first_before,
        "the server-first connection was joined in the kernel"
    );

    // IPv6 takes the same path.
    let _echo6 = t
        .world
        .serve(t.server.command(testapp()), "[::]:8082", "cart6")?;
    let to6 = SocketAddr::new(IpAddr::V6(t.server.ip6), 8082);
    let b = bulk(t.client.command(testapp()), to6, 4 << 20, None)?;
    assert!(b.ok && b.intact && b.received == 4 << 20, "IPv6: {b:?}");

    let redirected = events(&t.n1, "splice_redirected")? - before;
    assert!(
        redirected > 100,
        "the kernel redirected only {redirected} buffers"
    );
    // A join races the apps for the moment between its two sockets entering the map: an app that
    // sends just then sends its socket to userspace for good (in order, and counted). Ordering the
    // inserts makes that rare, a machine under load can still hit it once; more means joins fail.
    let passed = events(&t.n1, "splice_passed")?;
    eprintln!("splice_passed={passed}");
    assert!(
        passed <= 1,
        "{passed} of the 9 connections fell back to userspace"
    );

    // One access line per connection, each counting what its app sent and got back; the echo
    // server's greeting line comes first, so the client receives more than it sent.
    let mut received_total = 0u64;
    for n in sizes {
        let line = t.agent.wait_for(
            |l| {
                l.is_access()
                    && l.field("dst") == Some(to.to_string())
                    && l.field("bytes_sent") == Some(n.to_string())
            },
            Duration::from_secs(5),
        )?;
        assert_eq!(
            line.field("route").as_deref(),
            Some("same-node"),
            "{}",
            line.0
        );
        assert_eq!(
            line.field("result").as_deref(),
            Some("closed"),
            "{}",
            line.0
        );
        let received: usize = line
            .field("bytes_received")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(received > n, "{n} echoed plus the greeting: {}", line.0);
        received_total += received as u64;
    }
    let line = t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to_first.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(
        line.field("result").as_deref(),
        Some("closed"),
        "{}",
        line.0
    );
    assert_eq!(
        line.field("bytes_sent").as_deref(),
        Some("100000"),
        "{}",
        line.0
    );
    let received: usize = line
        .field("bytes_received")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(received >= 65536, "{}", line.0);
    received_total += received as u64;

    let line = t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to6.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(
        line.field("bytes_sent"),
        Some((4 << 20).to_string()),
        "{}",
        line.0
    );
    received_total += line
        .field("bytes_received")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);

    // Istio's byte counters agree with the access log, both directions of every connection.
    let total_sent: u64 = sizes.iter().map(|n| *n as u64).sum::<u64>() + 100_000 + (4 << 20);
    let request =
        t.n1.metric("istio_tcp_received_bytes_total", &[])
            .map(|v| v as u64)?;
    let response =
        t.n1.metric("istio_tcp_sent_bytes_total", &[])
            .map(|v| v as u64)?;
    assert_eq!(request, total_sent, "request bytes in the metrics");
    assert_eq!(response, received_total, "response bytes in the metrics");

    // Every joined connection checked its own accounting at the end (what each socket was given to
    // send against what the verdict and the agent put into it, and what the verdict and the agent
    // took from each socket against what it received) and found it whole.
    let mismatches: Vec<String> = t
        .agent
        .lines()
        .iter()
        .filter(|l| l.msg().starts_with("same-node fast path: "))
        .map(|l| l.0.to_string())
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    // And the checks ran: the large echoes outlast the join delay, so each of them was joined.
    let checked = events(&t.n1, "splice_checked")? - checked_before;
    assert!(
        checked >= 5,
        "only {checked} joined connections had their byte counts checked"
    );
    assert_eq!(events(&t.n1, "splice_mismatched")?, 0);
    Ok(())
}

/// An echo app on the server pod and a client holding a connection to it for `seconds`, once the
/// kernel carries it: the hold exchanges one byte each way every 50 ms, and the pair is joined at the
/// first exchange after 5 ms, so from then on only the kernel sees its bytes.
fn joined_hold(t: &SameNode, seconds: u32) -> Result<(SocketAddr, Proc, Proc)> {
    let echo = t
        .world
        .serve(t.server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8080);
    let h = t.world.hold(t.client.command(testapp()), to, seconds)?;
    let joined = eventually(Duration::from_secs(5), || {
        events(&t.n1, "splice_redirected").unwrap_or(0) > 0
    });
    assert!(joined, "the kernel carries the hold's bytes");
    Ok((to, h, echo))
}

/// Joined pairs now: each has an entry per socket in `FERRY_SPLICE_PEERS`, made at the join and
/// removed when the pair ends, with the slot it held under `capture.fast_path_max_pairs`.
fn joined_pairs(t: &SameNode) -> Result<usize> {
    let peers = PinnedU64Map::open(&t.n1.bpffs_root.join("maps/FERRY_SPLICE_PEERS"))?;
    Ok(peers.keys()?.len() / 2)
}

/// Waits until `want` pairs are joined.
fn wait_joined(t: &SameNode, want: usize, what: &str) -> Result<()> {
    let ok = eventually(Duration::from_secs(5), || {
        joined_pairs(t).is_ok_and(|n| n == want)
    });
    ensure!(
        ok,
        "{what}: {:?} pairs joined, want {want}",
        joined_pairs(t)
    );
    Ok(())
}

/// `capture.fast_path_max_pairs: 1`: a connection opened beside a joined one is relayed in
/// userspace and still carries its bytes, and the slot comes back when a joined pair ends — after a
/// clean end and after a policy change closed it — so the cap cannot leak its way to a fast path
/// that silently stops joining.
#[test]
fn pairs_beyond_the_cap_are_relayed_in_userspace_and_ended_pairs_give_their_slot_back() -> Result<()>
{
    let t = same_node("capture: {fast_path: true, fast_path_max_pairs: 1}\n")?;
    let _echo = t
        .world
        .serve(t.server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8080);

    let first = t.world.hold(t.client.command(testapp()), to, 4)?;
    wait_joined(&t, 1, "the first connection")?;
    let second = t.world.hold(t.client.command(testapp()), to, 2)?;
    second.wait_for_output("connected", Duration::from_secs(5))?;
    // Well past the join delay, and with bytes exchanged every 50 ms.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(joined_pairs(&t)?, 1, "the second connection is not joined");
    assert_eq!(
        events(&t.n1, "splice_at_cap")?,
        1,
        "the second connection is counted"
    );
    let b = bulk(t.client.command(testapp()), to, 4 << 20, None)?;
    assert!(b.ok && b.intact && b.received == 4 << 20, "{b:?}");
    second.wait_for_output("\"ok\":true", Duration::from_secs(10))?;
    first.wait_for_output("\"ok\":true", Duration::from_secs(10))?;
    wait_joined(&t, 0, "after every connection ended")?;
    let at_cap = events(&t.n1, "splice_at_cap")?;

    // Sequential connections each get the slot the one before gave back.
    for i in 0..3 {
        let h = t.world.hold(t.client.command(testapp()), to, 1)?;
        wait_joined(&t, 1, &format!("connection {i} after the first ones ended"))?;
        h.wait_for_output("\"ok\":true", Duration::from_secs(10))?;
        wait_joined(&t, 0, &format!("after connection {i}"))?;
    }

    // A joined connection that a policy change closes gives its slot back too.
    let h = t.world.hold(t.client.command(testapp()), to, 30)?;
    wait_joined(&t, 1, "the connection the policy will close")?;
    t.n1.write_policy("deny.yaml", DENY_SHOP)?;
    h.wait_for_output("\"ok\":false", Duration::from_secs(5))?;
    wait_joined(&t, 0, "after the policy closed it")?;
    std::fs::remove_file(t.n1.policies_dir().join("deny.yaml"))?;
    let allowed = eventually(Duration::from_secs(5), || {
        dial(t.client.command(testapp()), to, "x").is_ok_and(|d| d.ok)
    });
    assert!(allowed, "the policy's removal allows the pods again");
    let h = t.world.hold(t.client.command(testapp()), to, 1)?;
    wait_joined(&t, 1, "a connection after the policy closed one")?;
    h.wait_for_output("\"ok\":true", Duration::from_secs(10))?;
    assert_eq!(
        events(&t.n1, "splice_at_cap")?,
        at_cap,
        "no connection met the cap once a slot was free"
    );
    Ok(())
}

/// While a fast-path connection is open `ferry conns` shows the bytes the kernel carried, and a
/// policy reload that denies it closes it.
#[test]
fn a_policy_change_closes_a_fast_path_connection_and_conns_counts_its_bytes() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    let (to, h, _echo) = joined_hold(&t, 30)?;
    std::thread::sleep(Duration::from_secs(1));
    let conns = t.n1.cli(&["conns"])?;
    let row = conns
        .as_array()
        .and_then(|a| a.iter().find(|r| r["route"] == "same-node"))
        .with_context(|| format!("no same-node connection in {conns}"))?;
    assert!(
        row["bytes_sent"].as_u64().unwrap_or(0) >= 10,
        "ferry conns counts the bytes the kernel carried: {row}"
    );

    t.n1.write_policy("deny.yaml", DENY_SHOP)?;
    t.agent.wait_for(
        |l| l.msg() == "live connection closed: the new policies deny it",
        Duration::from_secs(5),
    )?;
    h.wait_for_output("\"ok\":false", Duration::from_secs(5))?;
    let d = dial(t.client.command(testapp()), to, "x")?;
    assert!(!d.ok, "new connections are refused: {d:?}");
    Ok(())
}

/// Once joined, the kernel carries a connection's bytes without waking the agent: a client and an
/// echo server exchanging a byte back to back redirect thousands of buffers a second, and the
/// agent's threads sleep through nearly all of them (it used to be woken for each one, as a read
/// readiness, only to find nothing to read).
#[test]
fn a_joined_connection_does_not_wake_the_agent_per_buffer() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    let _echo = t
        .world
        .serve(t.server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8080);
    let h = t
        .world
        .hold_pausing(t.client.command(testapp()), to, 4, 0)?;
    let joined = eventually(Duration::from_secs(5), || {
        events(&t.n1, "splice_redirected").unwrap_or(0) > 0
    });
    assert!(joined, "the kernel carries the exchange");
    let (switches, redirected) = (
        t.agent.context_switches()?,
        events(&t.n1, "splice_redirected")?,
    );
    std::thread::sleep(Duration::from_secs(1));
    let switches = t.agent.context_switches()? - switches;
    let redirected = events(&t.n1, "splice_redirected")? - redirected;
    eprintln!("redirected={redirected} agent_context_switches={switches}");
    assert!(
        redirected > 1000,
        "the exchange went on in the kernel: {redirected} buffers in a second"
    );
    assert!(
        switches * 20 < redirected,
        "the agent was switched {switches} times while the kernel redirected {redirected} buffers"
    );
    let out = {
        h.wait_for_output("\"ok\":", Duration::from_secs(10))?;
        h.output()
    };
    assert!(out.contains("\"ok\":true"), "{out}");
    Ok(())
}

/// Bytes the kernel cannot redirect fall back to the userspace relay, in order and counted: here one
/// socket of a joined pair is taken out of the sockhash behind the agent's back (as a socket that
/// closes leaves it), so the other's verdict finds no peer to redirect to.
///
/// Not in the suite: taking a live socket out of the sockhash drops what the kernel had queued for it
/// at that instant (the agent only ever does that to sockets that are closing), and one run in the
/// full suite lost the hold's byte that way and hung. Run it with `--ignored`.
#[test]
#[ignore = "removing a live socket from the sockhash can drop a byte in flight (see the doc)"]
fn bytes_the_kernel_cannot_redirect_fall_back_to_userspace_in_order() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    let (to, h, _echo) = joined_hold(&t, 3)?;

    let maps = t.n1.bpffs_root.join("maps");
    let peers = PinnedU64Map::open(&maps.join("FERRY_SPLICE_PEERS"))?.keys()?;
    assert_eq!(peers.len(), 2, "one joined pair: {peers:x?}");
    PinnedU64Map::open(&maps.join("FERRY_SPLICE"))?.delete(peers[0])?;
    let redirected = events(&t.n1, "splice_redirected")?;

    // The hold goes on exchanging a byte each way every 50 ms and checks each comes back.
    let out = {
        h.wait_for_output("\"ok\":", Duration::from_secs(10))?;
        h.output()
    };
    assert!(out.contains("\"ok\":true"), "{out}");
    assert_eq!(events(&t.n1, "splice_passed")?, 1, "one socket fell back");
    assert_eq!(
        events(&t.n1, "splice_redirected")?,
        redirected,
        "nothing was redirected after the fallback"
    );
    let rounds: u64 = out
        .split("\"rounds\":")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("rounds in {out}"))?;
    assert!(rounds > 20, "{out}");
    // Every byte is counted once, whichever way it went: the hold's rounds one way, the greeting and
    // the echoed rounds the other.
    let line = t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(
        line.field("result").as_deref(),
        Some("closed"),
        "{}",
        line.0
    );
    assert_eq!(
        line.field("bytes_sent"),
        Some(rounds.to_string()),
        "{}",
        line.0
    );
    let greeting = format!("cart peer={} local={to}\n", t.client.ip4);
    let received: u64 = line
        .field("bytes_received")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The greeting also names the client's port: ':' and 1 to 5 digits.
    let port_len = received.checked_sub(rounds + greeting.len() as u64);
    assert!(
        port_len.is_some_and(|p| (2..=6).contains(&p)),
        "the greeting ({greeting:?} with the port) and {rounds} echoed bytes: {}",
        line.0
    );
    Ok(())
}

/// With the fast path off in the node config, same-node connections are relayed in userspace: bytes
/// intact, counted, and the verdict never runs.
#[test]
fn with_the_fast_path_off_same_node_traffic_is_relayed_in_userspace() -> Result<()> {
    let t = same_node("")?;
    t.agent.wait_for(
        |l| l.msg().starts_with("same-node fast path off"),
        Duration::from_secs(5),
    )?;
    let _echo = t
        .world
        .serve(t.server.command(testapp()), "0.0.0.0:8080", "cart")?;
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8080);
    let n = 4 * 1024 * 1024;
    let b = bulk(t.client.command(testapp()), to, n, None)?;
    assert!(b.ok && b.intact && b.received == n, "{b:?}");
    let line = t.agent.wait_for(
        |l| l.is_access() && l.field("dst") == Some(to.to_string()),
        Duration::from_secs(5),
    )?;
    assert_eq!(line.field("bytes_sent"), Some(n.to_string()), "{}", line.0);
    assert_eq!(events(&t.n1, "splice_redirected")?, 0);
    let _ = &t.client;
    Ok(())
}

/// A connection whose client's bytes arrive together with its end of stream is not joined: the
/// agent relays those bytes and then finds its client-facing socket no longer established, which the
/// sockhash refuses. It used to try anyway and warn for every such connection.
#[test]
fn a_connection_that_already_ended_its_stream_is_not_joined() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    // The server answers only once the client's stream has ended, so when the agent has relayed the
    // client's bytes both queues are empty and the server side waits: everything joining asks for,
    // but an established client-facing socket.
    let server = r#"
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 8080))
l.listen(16)
print("listening", flush=True)
while True:
    c, _ = l.accept()
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        n += len(b)
    c.sendall(str(n).encode())
    c.close()
"#;
    let mut srv = t.server.command("python3");
    srv.args(["-c", server]);
    let srv = t.world.spawn(srv, "counter")?;
    srv.wait_for_output("listening", Duration::from_secs(10))?;
    // Corked, the kilobyte and the FIN leave in one segment, well after the join delay.
    let client = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080))
time.sleep(0.05)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
s.sendall(b"x" * 1024)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = s.recv(100)
    if not b:
        break
    got += b
print("COUNTED", got.decode(), flush=True)
"#;
    for i in 0..5 {
        let mut cl = t.client.command("python3");
        cl.args(["-c", client, &t.server.ip4.to_string()]);
        let out = run_with_timeout(cl, Duration::from_secs(20))?;
        assert_eq!(out.trim(), "COUNTED 1024", "connection {i}");
    }
    let to = SocketAddr::new(IpAddr::V4(t.server.ip4), 8080).to_string();
    let ended = eventually(Duration::from_secs(5), || {
        t.agent
            .access_lines()
            .iter()
            .filter(|l| l.field("dst").as_deref() == Some(to.as_str()))
            .count()
            == 5
    });
    assert!(ended, "five access lines for {to}");
    let tried: Vec<String> = t
        .agent
        .lines()
        .into_iter()
        .filter(|l| l.msg().contains("fast path not used"))
        .map(|l| l.0.to_string())
        .collect();
    assert!(tried.is_empty(), "joining was tried: {tried:?}");
    assert_eq!(events(&t.n1, "splice_redirected")?, 0);
    Ok(())
}

/// What `tests/fastpath/overlap.py` saw: the server's counts of each byte kind, and the node's
/// fast-path events once the connection was joined (`splice_redirected` after the exchange) and once
/// the segment arrived (`splice_passed`).
struct Overlap {
    got: serde_json::Value,
    joined: bool,
    passed: u64,
    /// Why the agent says a joined socket's bytes went to userspace.
    reasons: Vec<String>,
}

impl Overlap {
    /// The exchange before it, then the new bytes once and the repeated ones not again.
    fn assert_delivered_once(&self) {
        let got = &self.got;
        assert_eq!(got["a"], 60, "the exchange before it arrived: {got}");
        assert_eq!(got["n"], 300, "the new bytes arrive once: {got}");
        assert_eq!(
            got["o"], 700,
            "the repeated bytes do not arrive again: {got}"
        );
    }
}

/// Runs `tests/fastpath/overlap.py`: a connection held long enough to be joined when the fast path is
/// on, then (after `between` ran on the quiet connection) 700 bytes, then a retransmitted segment that
/// repeats those 700 bytes the agent's socket already received and carries 300 new ones after them.
fn overlap_injected(extra: &str, between: impl FnOnce(&SameNode) -> Result<()>) -> Result<Overlap> {
    let t = same_node(extra)?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fastpath/overlap.py");
    let mut srv = t.server.command("python3");
    srv.arg(&script).args(["server", "8080"]);
    let srv = t.world.spawn(srv, "overlap-server")?;
    srv.wait_for_output("listening", Duration::from_secs(10))?;
    let go = t.world.dir.join("overlap-go");
    let mut cl = t.client.command("python3");
    cl.arg(&script)
        .args(["client", &t.server.ip4.to_string(), "8080"])
        .arg(&go);
    let cl = t.world.spawn(cl, "overlap-client")?;
    cl.wait_for_output("EXCHANGED", Duration::from_secs(20))?;
    let joined = events(&t.n1, "splice_redirected")? > 0;
    between(&t)?;
    std::fs::write(&go, b"")?;
    cl.wait_for_output("INJECTED ", Duration::from_secs(20))?;
    srv.wait_for_output("RECEIVED ", Duration::from_secs(20))?;
    let out = srv.output();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RECEIVED "))
        .context("the server's report")?;
    let got: serde_json::Value = serde_json::from_str(line)?;
    let passed = events(&t.n1, "splice_passed")?;
    // The agent tells why as it reads the first bytes that went to userspace, which the server has
    // by now.
    let reasons = t
        .agent
        .lines()
        .iter()
        .filter(|l| l.msg().contains("bytes went to userspace"))
        .filter_map(|l| l.field("reason"))
        .collect();
    eprintln!(
        "client: {}server: {got}, joined: {joined}, fell back: {passed} {reasons:?}",
        cl.output()
    );
    Ok(Overlap {
        got,
        joined,
        passed,
        reasons,
    })
}

/// Relayed in userspace, a retransmission that overlaps bytes already received reaches the server
/// as TCP means it to: the new bytes once, the repeated head not again (`tcp_recvmsg` skips it).
#[test]
fn relayed_in_userspace_an_overlapping_retransmission_is_delivered_once() -> Result<()> {
    let o = overlap_injected("", |_| Ok(()))?;
    assert!(!o.joined, "the fast path is off by default");
    o.assert_delivered_once();
    Ok(())
}

/// The same on a joined connection. TCP queues such a segment whole, and the stream verdict is handed
/// whole buffers (`tcp_read_skb`), so without a guard the repeated head is redirected a second time
/// (on Linux 6.18 the server received the 700 bytes twice): the verdict cuts it off, as
/// `tcp_recvmsg` skips it, and counts the cut once the connection has ended.
#[test]
fn joined_an_overlapping_retransmission_is_delivered_once() -> Result<()> {
    let o = overlap_injected(FAST_PATH_ON, |_| Ok(()))?;
    assert!(o.joined, "the connection was joined before the injection");
    // Userspace would skip the repeated head too: the kernel must have carried the segment.
    assert_eq!(o.passed, 0, "no socket fell back to userspace: {}", o.got);
    assert!(o.reasons.is_empty(), "{:?}", o.reasons);
    o.assert_delivered_once();
    Ok(())
}

/// Once a joined socket's bytes go to userspace, the verdict passes each buffer on whole for the agent
/// to read, and the kernel moves that socket's `copied_seq` only as the agent reads: the guard counts
/// sequence numbers on from the fallback itself, so a repeated head is still cut. Here the delivery
/// socket is taken out of the sockhash behind the agent's back (as a socket that closes leaves it)
/// while the connection is quiet, so the client-facing socket's next bytes find no peer.
#[test]
fn after_a_fallback_an_overlapping_retransmission_is_delivered_once() -> Result<()> {
    let o = overlap_injected(FAST_PATH_ON, |t| {
        let cookie = delivery_cookie(t)?;
        let maps = t.n1.bpffs_root.join("maps");
        let peers = PinnedU64Map::open(&maps.join("FERRY_SPLICE_PEERS"))?.keys()?;
        assert!(
            peers.contains(&cookie),
            "the delivery socket {cookie:x} is joined: {peers:x?}"
        );
        PinnedU64Map::open(&maps.join("FERRY_SPLICE"))?.delete(cookie)
    })?;
    assert!(o.joined, "the connection was joined during the exchange");
    assert_eq!(o.passed, 1, "the client-facing socket fell back: {}", o.got);
    assert_eq!(
        o.reasons,
        ["the peer socket was not in the sockhash"],
        "the agent tells why"
    );
    o.assert_delivered_once();
    Ok(())
}

/// `tests/fastpath/pattern.py`: a stream whose every byte tells its offset.
fn pattern_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fastpath/pattern.py")
}

/// The checking server of `pattern.py` on the server pod's port 8080, with `args`.
fn pattern_server(t: &SameNode, args: &[&str]) -> Result<Proc> {
    let mut srv = t.server.command("python3");
    srv.arg(pattern_script())
        .args(["server", "8080"])
        .args(args);
    let srv = t.world.spawn(srv, "pattern-server")?;
    srv.wait_for_output("listening", Duration::from_secs(10))?;
    Ok(srv)
}

/// The client of `pattern.py` in the client pod, sending `bytes` to the server's port 8080.
fn pattern_client(t: &SameNode, bytes: usize) -> Command {
    let mut cl = t.client.command("python3");
    cl.arg(pattern_script()).args([
        "client",
        &t.server.ip4.to_string(),
        "8080",
        &bytes.to_string(),
    ]);
    cl
}

/// The client-facing socket of the one joined pair: its map, cookie and entry (whose peer is the
/// delivery socket).
fn client_facing_entry(t: &SameNode) -> Result<(PinnedU64Map, u64, ferry_common::SplicePeer)> {
    let delivery = delivery_cookie(t)?;
    let peers = PinnedU64Map::open(&t.n1.bpffs_root.join("maps/FERRY_SPLICE_PEERS"))?;
    let facing = peers
        .keys()?
        .into_iter()
        .find(|&k| k != delivery)
        .context("the client-facing socket's entry")?;
    let entry: ferry_common::SplicePeer = peers.get(facing)?;
    assert_eq!(entry.peer, delivery, "{entry:?}");
    Ok((peers, facing, entry))
}

/// The cookie of the agent's delivery socket: in the server pod, connected to the server's port 8080
/// (`ss` prints a socket's cookie as `sk:`).
fn delivery_cookie(t: &SameNode) -> Result<u64> {
    let dst = format!("{}:8080", t.server.ip4);
    let ss = std::process::Command::new("ip")
        .args(["netns", "exec", &t.server.netns, "ss", "-tneH", "dst", &dst])
        .output()?;
    let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
    ss.split_whitespace()
        .find_map(|w| w.strip_prefix("sk:"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .with_context(|| format!("the delivery socket's cookie in {ss:?}"))
}

/// Runs an echo exchange until the pair is joined, then `tamper`s with the client-facing socket's
/// map entry (given the map, the socket's cookie and its entry) and sends more: the agent must end
/// the connection without relaying those bytes, and log a line `said` accepts within `within`.
fn relay_ended(
    tamper: impl FnOnce(&PinnedU64Map, u64, ferry_common::SplicePeer) -> Result<()>,
    said: impl Fn(&ferry_e2e::LogLine) -> bool,
    within: Duration,
) -> Result<SameNode> {
    let t = same_node(FAST_PATH_ON)?;
    let server = r#"
import socket, threading
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 8080))
l.listen(16)
print("listening", flush=True)
def serve(c):
    n = 0
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            n += len(b)
            c.sendall(b)
    except OSError:
        pass
    print("CLOSED", n, flush=True)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,)).start()
"#;
    let mut srv = t.server.command("python3");
    srv.args(["-c", server]);
    let srv = t.world.spawn(srv, "echo")?;
    srv.wait_for_output("listening", Duration::from_secs(10))?;
    let go = t.world.dir.join("repeat-go");
    let client = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 8080))
for _ in range(10):
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    time.sleep(0.01)
print("EXCHANGED", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
s.settimeout(60)
s.sendall(b"after" * 100)
try:
    got = s.recv(1000)
    print("ENDED" if not got else "ECHOED", len(got), flush=True)
except ConnectionResetError:
    print("ENDED reset", flush=True)
except socket.timeout:
    print("TIMEOUT", flush=True)
"#;
    let mut cl = t.client.command("python3");
    cl.args(["-c", client, &t.server.ip4.to_string()]).arg(&go);
    let cl = t.world.spawn(cl, "client")?;
    cl.wait_for_output("EXCHANGED", Duration::from_secs(20))?;
    assert!(
        events(&t.n1, "splice_redirected")? > 0,
        "the connection was joined during the exchange"
    );
    let (peers, facing, entry) = client_facing_entry(&t)?;
    tamper(&peers, facing, entry)?;
    std::fs::write(&go, b"")?;
    cl.wait_for_output("ENDED", within + Duration::from_secs(10))?;
    srv.wait_for_output("CLOSED", Duration::from_secs(10))?;
    assert!(
        srv.output().contains("CLOSED 40\n"),
        "the server got the exchange and none of the bytes after it: {}",
        srv.output()
    );
    t.agent.wait_for(said, Duration::from_secs(5))?;
    Ok(t)
}

/// [`relay_ended`] for a refusal: the agent says why (`reason`) and counts it.
fn relay_refused(
    tamper: impl FnOnce(&PinnedU64Map, u64, ferry_common::SplicePeer) -> Result<()>,
    reason: &str,
) -> Result<()> {
    let t = relay_ended(
        tamper,
        |l| {
            l.msg().contains("closing the connection rather")
                && l.field("reason").as_deref() == Some(reason)
        },
        Duration::from_secs(10),
    )?;
    assert_eq!(events(&t.n1, "splice_refused")?, 1);
    Ok(())
}

/// Bytes the verdict counted as redirected into the server-facing socket that never reach it (as if
/// the kernel lost them): once the client-facing socket falls back, the relay waits for them before
/// writing, sees the count stop while that socket has nothing left to send, and ends the connection
/// after its 10 s limit, naming the shortfall — rather than hang, or write ahead of them.
#[test]
fn redirected_bytes_that_never_arrive_end_the_connection() -> Result<()> {
    let t = relay_ended(
        |peers, facing, mut entry| {
            entry.redirected += 1000;
            // No such socket: the client's next bytes go to the agent.
            entry.peer = u64::MAX;
            peers.set(facing, &entry)
        },
        |l| {
            l.is_access()
                && l.field("result").as_deref() == Some("error")
                && l.field("reason").is_some_and(|e| {
                    e.contains("did not hand 1000 redirected bytes to the server-facing socket")
                })
        },
        Duration::from_secs(20),
    )?;
    assert_eq!(events(&t.n1, "splice_refused")?, 0);
    Ok(())
}

/// When the verdict hands userspace a buffer whose already-carried head it could not cut, relaying
/// it would deliver those bytes twice: the agent ends the connection instead, and says why. The
/// verdict's finding is set in the entry, as the verdict sets it; the verdict itself then passes the
/// client's next bytes to the agent.
#[test]
fn bytes_that_may_repeat_carried_ones_end_the_connection() -> Result<()> {
    use ferry_common::pass_reason::{REPEAT_TOO_LONG, name};
    relay_refused(
        |peers, facing, mut entry| {
            entry.passed = REPEAT_TOO_LONG;
            peers.set(facing, &entry)
        },
        name(REPEAT_TOO_LONG),
    )
}

/// A joined socket whose entry the LRU map evicted passes its bytes to userspace, and the count
/// that tells whether the kernel still holds bytes it redirected into the other socket went with
/// the entry: the agent cannot order the new bytes after those, and ends the connection rather
/// than risk reordering them.
#[test]
fn bytes_of_a_socket_whose_entry_was_evicted_end_the_connection() -> Result<()> {
    relay_refused(
        |peers, facing, _| peers.delete(facing),
        "its map entry is gone",
    )
}

/// A joined socket that falls back to userspace while the kernel still holds bytes it redirected
/// into the other socket (its receiving app stalled): the agent's relay must not write the bytes it
/// now reads ahead of those. The client sends 24 MiB and pauses while the server reads 8 MiB and
/// stalls; the client-facing socket's entry is then pointed at a socket that is not in the sockhash,
/// so the verdict cannot redirect the client's next 8 MiB and hands them to the agent. Every byte
/// arrives once and in order.
#[test]
fn a_fallback_behind_a_stalled_receiver_keeps_every_byte_in_order() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    let _srv = pattern_server(&t, &["--stall-at", &(8 << 20).to_string(), "--stall", "4"])?;
    let go = t.world.dir.join("fallback-go");
    let mut cl = pattern_client(&t, 32 << 20);
    cl.args(["--pause-at", &(24 << 20).to_string(), "--go"])
        .arg(&go);
    let cl = t.world.spawn(cl, "client")?;
    cl.wait_for_output("PAUSED", Duration::from_secs(30))?;
    assert!(
        events(&t.n1, "splice_redirected")? > 0,
        "the connection was joined"
    );
    // The client's last bytes have reached the verdict: nothing updates the entry while it is
    // rewritten.
    std::thread::sleep(Duration::from_millis(200));
    let (peers, facing, mut entry) = client_facing_entry(&t)?;
    // Socket cookies count up from 1 and are never reused; this one names no socket.
    entry.peer = u64::MAX;
    peers.set(facing, &entry)?;
    std::fs::write(&go, b"")?;
    cl.wait_for_output("RESULT", Duration::from_secs(60))?;
    let n = 32usize << 20;
    assert!(
        cl.output().contains(&format!("RESULT {n} -1")),
        "bytes received and the first offset that differs from what was sent: {}",
        cl.output()
    );
    t.agent.wait_for(
        |l| {
            l.msg().contains("bytes went to userspace")
                && l.field("reason").as_deref()
                    == Some(ferry_common::pass_reason::name(
                        ferry_common::pass_reason::REDIRECT_FAILED,
                    ))
        },
        Duration::from_secs(5),
    )?;
    // The connection's own byte accounting at its end agrees: every byte each socket was given came
    // from the verdict or the agent, once.
    let checked = eventually(Duration::from_secs(5), || {
        events(&t.n1, "splice_checked").unwrap_or(0) >= 1
    });
    assert!(checked, "the joined connection's byte counts were checked");
    assert_eq!(events(&t.n1, "splice_mismatched")?, 0);
    Ok(())
}

/// A joined connection whose receiving app reads slowly: the kernel's sender meets a full send
/// buffer in the middle of a buffer it redirects, over and over. Every byte still arrives once and in
/// order.
#[test]
fn a_slow_reader_behind_the_fast_path_gets_every_byte_once() -> Result<()> {
    let t = same_node(FAST_PATH_ON)?;
    // Pausing between reads keeps the sender running into a full buffer.
    let _srv = pattern_server(
        &t,
        &[
            "--rcvbuf",
            "65536",
            "--pause-every",
            "16",
            "--pause",
            "0.005",
        ],
    )?;
    let n: usize = 32 << 20;
    let before = events(&t.n1, "splice_redirected")?;
    for i in 0..3 {
        let out = run_with_timeout(pattern_client(&t, n), Duration::from_secs(120))?;
        assert_eq!(
            out.trim(),
            format!("RESULT {n} -1"),
            "connection {i}: bytes received and the first offset that differs from what was sent"
        );
    }
    assert!(
        events(&t.n1, "splice_redirected")? > before,
        "the kernel carried the bytes"
    );
    Ok(())
}
