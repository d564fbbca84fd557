//! `cargo xtask soak`: many concurrent connections through one pair of agents (cross-node), each
//! carrying its own bytes, checked on return; the agents' memory with all of them open.
//!
//! The world: two routed nodes, a client pod on one and a server pod on the other, both enrolled.
//! `tests/soak/soak.py` (asyncio, one process each) is the load: the client opens every connection
//! (one-byte round trip each), holds them all, then sends a pattern unique to each connection on all of
//! them at once, compares the echo, half-closes and reads to EOF. It fails when any connection does not
//! open or its bytes come back wrong.
//!
//! It also fails when an agent's memory is over the bound, 8 MB + 4 KB per connection, at
//! every size. The agents run the binary the image ships (static), as in the bench:
//!
//! - **Per connection:** RSS with all connections open minus RSS just before opening them, divided by
//!   the count, must be at most 4 KB (4,000 bytes). This is the part that scales; the agents have
//!   already carried a few connections when the first figure is taken, so pooled HBONE connections and
//!   the allocator's arenas exist in both figures and the difference is what the connections hold.
//! - **In total:** RSS with all open at most 8 MB + 4 KB × count.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ferry_e2e::{Proc, World};
use serde_json::Value;

use crate::{
    Bins,
    bench::{rss_kib, set_limits},
};

const PORT: u16 = 9000;
/// Bytes each connection carries each way.
const BYTES: u32 = 16 * 1024;
/// The bound: this much per agent...
const FIXED_BYTES: f64 = 8_000_000.0;
/// ... plus this much per open connection.
const PER_CONN_BYTES: f64 = 4_000.0;

fn soak_py() -> PathBuf {
    crate::xtask_dir().join("../tests/soak/soak.py")
}

fn progress(start: Instant, text: &str) {
    eprintln!("[soak {:>6.1}s] {text}", start.elapsed().as_secs_f64());
}

/// The JSON after `prefix` on a line of the process's output, waiting up to `timeout` for it.
fn wait_json(p: &Proc, prefix: &str, timeout: Duration) -> Result<Value> {
    p.wait_for_output(prefix, timeout)?;
    let out = p.output();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .context("the line just seen")?;
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}

pub fn run(bins: &Bins, conns: u32) -> Result<()> {
    let started = Instant::now();
    let nofile = set_limits()?;
    // Each agent holds one descriptor per proxied connection, the client and server one each.
    ensure!(
        u64::from(conns) + 256 <= nofile,
        "{conns} connections do not fit RLIMIT_NOFILE {nofile} (raising the hard limit needs CAP_SYS_RESOURCE)"
    );
    // SAFETY: single-threaded at this point; the test world reads these to find the binaries.
    unsafe {
        std::env::set_var("FERRY_BIN", &bins.ferry);
        std::env::set_var("FERRY_TESTAPP", &bins.testapp);
    }
    progress(started, "building the test world");
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, true)?;
    let n2 = world.add_node("n2", 2, true)?;
    let client = world.add_pod_as(&n1, "client", 10, "shop", "frontend")?;
    let server = world.add_pod_as(&n2, "server", 20, "shop", "cart")?;
    for n in [&n1, &n2] {
        world.write_workloads(n, &[&client, &server])?;
    }
    let agents = [world.start_agent(&n1)?, world.start_agent(&n2)?];
    for a in &agents {
        a.wait_for(|l| l.msg() == "pod enrolled", Duration::from_secs(10))?;
    }
    let mut srv = server.command("python3");
    srv.arg(soak_py())
        .args(["server", "--port", &PORT.to_string()]);
    let srv = world.spawn(srv, "soak-server")?;
    srv.wait_for_output("listening", Duration::from_secs(10))?;
    let to = format!("{}:{PORT}", server.ip4);
    let client_run = |count: u32, label: &str| -> Result<(Proc, PathBuf)> {
        let go = world.dir.join(format!("{label}.go"));
        let mut c = client.command("python3");
        c.arg(soak_py()).args([
            "client",
            "--to",
            &to,
            "--count",
            &count.to_string(),
            "--bytes",
            &BYTES.to_string(),
            "--go",
        ]);
        c.arg(&go);
        Ok((world.spawn(c, label)?, go))
    };

    // A few connections first, so the idle figures are of agents that have carried traffic.
    let (warm, go) = client_run(20, "warm-up")?;
    std::fs::write(&go, "")?;
    let w = wait_json(&warm, "DONE ", Duration::from_secs(60))?;
    ensure!(w["intact"] == 20, "warm-up: {w}");
    std::thread::sleep(Duration::from_secs(2));
    let idle: Vec<u64> = agents
        .iter()
        .map(|a| rss_kib(a.pid))
        .collect::<Result<_>>()?;

    progress(started, &format!("opening {conns} connections"));
    let (load, go) = client_run(conns, "soak-client")?;
    // Opening runs at some hundreds per second here; allow for a slow, shared machine.
    let open_limit = Duration::from_secs(60 + u64::from(conns) / 20);
    let opened = wait_json(&load, "OPEN ", open_limit)?;
    std::thread::sleep(Duration::from_secs(2));
    let open: Vec<u64> = agents
        .iter()
        .map(|a| rss_kib(a.pid))
        .collect::<Result<_>>()?;
    progress(started, &format!("opened: {opened}; carrying bytes on all"));
    std::fs::write(&go, "")?;
    let done = wait_json(&load, "DONE ", open_limit)?;
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = agents
        .iter()
        .map(|a| rss_kib(a.pid))
        .collect::<Result<_>>()?;
    progress(started, &format!("done: {done}"));

    let n = f64::from(conns);
    let total_bound = FIXED_BYTES + PER_CONN_BYTES * n;
    println!(
        "\n### Soak: {conns} concurrent connections, cross-node, {BYTES} B each way on each\n\nopened in {:.1} s, carried in {:.1} s; intact {} / failed {}\n\n| agent | idle RSS | with {conns} open | per connection (bound 4 KB) | after close | total (bound 8 MB + 4 KB/conn: {:.1} MiB) |\n| --- | --- | --- | --- | --- | --- |",
        opened["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        done["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        done["intact"],
        done["failed"],
        total_bound / MIB,
    );
    let mut over = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let side = if i == 0 { "client side" } else { "server side" };
        let (idle_b, open_b) = (idle[i] as f64 * 1024.0, open[i] as f64 * 1024.0);
        let per = (open_b - idle_b) / n;
        let per_met = per <= PER_CONN_BYTES;
        let total_met = open_b <= total_bound;
        println!(
            "| {} ({side}) | {:.1} MiB | {:.1} MiB | {:.0} B, {} | {:.1} MiB | {} |",
            a.node,
            idle_b / MIB,
            open_b / MIB,
            per,
            if per_met { "met" } else { "**missed**" },
            after[i] as f64 / 1024.0,
            if total_met { "met" } else { "**missed**" },
        );
        if !per_met {
            over.push(format!(
                "{} ({side}) grew by {per:.0} B per connection, over 4,000 B ({:.1} MiB idle, {:.1} MiB with {conns} open)",
                a.node,
                idle_b / MIB,
                open_b / MIB
            ));
        }
        if !total_met {
            over.push(format!(
                "{} ({side}) held {:.1} MiB with {conns} open, over 8 MB + 4 KB per connection ({:.1} MiB)",
                a.node,
                open_b / MIB,
                total_bound / MIB
            ));
        }
    }
    if opened["open"] != conns || done["intact"] != conns {
        bail!(
            "not every connection completed intact: opened {opened}, done {done} (client output in {})",
            load.out.display()
        );
    }
    if !over.is_empty() {
        bail!("agent memory over its bound: {}", over.join("; "));
    }
    drop(world);
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;
