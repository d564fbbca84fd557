//! `cargo xtask bench`: Ferry against direct TCP on the same test world, in the same run.
//!
//! The world has two routed nodes. Each node holds a *mesh* pair of pods (enrolled: their traffic is
//! captured and carried by the agents) and a *plain* pair (not in any workloads file: nothing
//! captures them). Both pairs hang off the same bridges, veths and fabric, so the only difference
//! between "direct" and "Ferry" is the agents. Every scenario alternates direct and Ferry rounds
//! (ABBA order) so drift on this shared machine hits both alike. A third, unrouted node carries the
//! memory-per-pod measurement with its own agent.
//!
//! Request/response and bulk also run a *reference*: the plain pods' traffic through plain relays
//! (`ferry-bench relay`: two blocking threads copying bytes, no TLS, no framing, no policy), one at
//! each end across nodes and one on the client's side on the same node, where the agents sit. It is
//! about the least two proxies in the agents' place can cost on this machine, so it tells how much of
//! Ferry's cross-node cost is the hops themselves and how much is Ferry's. (On the same node the
//! relay's second leg crosses the bridge, which the agent's delivery does not: not a floor there.)
//!
//! Output: a markdown table on stdout, `bench.json` and `latency.svg` in the output directory.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ferry_e2e::{Agent, Node, NodeOptions, Pod, World, run_with_timeout, sh};
use serde_json::{Value, json};

use crate::Bins;

const ECHO: u16 = 9000;
const SINK: u16 = 9001;
const HOLD: u16 = 9002;
/// The reference relays listen on the service port plus these: cross-node (client and remote pod),
/// same-node (client pod only).
const RELAY_CROSS: u16 = 100;
const RELAY_SAME: u16 = 200;
const KIB: u64 = 1024;
const GIB: f64 = (1u64 << 30) as f64;

/// How much of everything; `--quick` shrinks each so the whole run is a smoke test.
struct Params {
    rr_rounds: usize,
    rr_per_round: usize,
    rr_warmup: usize,
    churn_rounds: usize,
    churn_per_round: usize,
    bulk_rounds: usize,
    bulk_bytes_per_round: u64,
    pod_counts: [usize; 3],
    /// Creating pods (netns, veth, cgroups) is slow: stop growing when the projection exceeds this.
    pod_budget: Duration,
    hold_conns: usize,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rr_rounds: 2,
                rr_per_round: 1_000,
                rr_warmup: 100,
                churn_rounds: 2,
                churn_per_round: 200,
                bulk_rounds: 2,
                bulk_bytes_per_round: 32 << 20,
                pod_counts: [1, 10, 20],
                pod_budget: Duration::from_secs(10),
                hold_conns: 1_000,
            }
        } else {
            Self {
                rr_rounds: 8,
                rr_per_round: 5_000,
                rr_warmup: 500,
                churn_rounds: 8,
                churn_per_round: 1_250,
                bulk_rounds: 4,
                bulk_bytes_per_round: 256 << 20,
                pod_counts: [1, 100, 1_000],
                pod_budget: Duration::from_secs(200),
                hold_conns: 10_000,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Direct,
    Ferry,
    /// The plain pods through the reference relays.
    Relays,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Ferry => "ferry",
            Via::Relays => "relays",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Topo {
    Same,
    Cross,
}

impl Topo {
    fn name(self) -> &'static str {
        match self {
            Topo::Same => "same-node",
            Topo::Cross => "cross-node",
        }
    }
}

struct Bench {
    world: World,
    bin: PathBuf,
    /// Mesh (enrolled) and plain (uncaptured) pods: client on node 1, servers on nodes 1 and 2.
    mesh: Trio,
    plain: Trio,
    agents: Vec<Agent>,
    /// The reference relays' processes (client pod, remote pod).
    relays: Vec<u32>,
    /// The node of the client and the same-node server (its agent joins same-node pairs).
    n1: Node,
}

struct Trio {
    client: Pod,
    local: Pod,
    remote: Pod,
}

impl Bench {
    fn pods(&self, via: Via) -> &Trio {
        match via {
            Via::Direct | Via::Relays => &self.plain,
            Via::Ferry => &self.mesh,
        }
    }
    fn target(&self, via: Via, topo: Topo, port: u16) -> String {
        if via == Via::Relays {
            let offset = match topo {
                Topo::Cross => RELAY_CROSS,
                Topo::Same => RELAY_SAME,
            };
            return format!("127.0.0.1:{}", port + offset);
        }
        let t = self.pods(via);
        let s = match topo {
            Topo::Same => &t.local,
            Topo::Cross => &t.remote,
        };
        format!("{}:{port}", s.ip4)
    }
    /// Runs one client of `ferry-bench` in the client pod of `via` and parses its output.
    fn client(&self, via: Via, args: &[String], timeout: Duration) -> Result<Output> {
        let mut cmd = self.pods(via).client.command(&self.bin);
        cmd.args(args);
        let out = run_with_timeout(cmd, timeout)
            .with_context(|| format!("ferry-bench {} ({})", args.join(" "), via.name()));
        if out.is_err() && via == Via::Ferry {
            // The agents log a connection (and check a joined one's byte counts) as it closes: give
            // them a moment before the world is torn down, so kept logs show the failed round.
            std::thread::sleep(Duration::from_secs(2));
            self.save_tcp_counters();
        }
        Output::parse(&out?)
    }
    /// Every netns's TCP counters (`nstat -az`: retransmissions, D-SACKs, ...) into the world's
    /// directory, which a failed run keeps: they go with the netns at teardown.
    fn save_tcp_counters(&self) {
        let dir = &self.world.dir;
        let Some(prefix) = dir.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for ns in String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(prefix))
        {
            if let Ok(o) = Command::new("ip")
                .args(["netns", "exec", ns, "nstat", "-az"])
                .output()
            {
                let _ = std::fs::write(dir.join(format!("nstat-{ns}.txt")), o.stdout);
            }
        }
    }
    /// CPU seconds (user + system) of both mesh agents so far.
    fn agent_cpu(&self) -> Result<f64> {
        self.agents.iter().map(|a| cpu_seconds(a.pid)).sum()
    }
    /// CPU seconds of the reference relays so far.
    fn relay_cpu(&self) -> Result<f64> {
        self.relays.iter().map(|&pid| cpu_seconds(pid)).sum()
    }
    /// CPU seconds of what carries `via`'s traffic besides the apps (nothing for direct TCP).
    fn carrier_cpu(&self, via: Via) -> Result<f64> {
        match via {
            Via::Direct => Ok(0.0),
            Via::Ferry => self.agent_cpu(),
            Via::Relays => self.relay_cpu(),
        }
    }
}

/// A client's output: `key=value` header words, then samples in nanoseconds, one per line.
struct Output {
    kv: BTreeMap<String, u64>,
    samples: Vec<u64>,
}

impl Output {
    fn parse(text: &str) -> Result<Self> {
        let mut kv = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.contains('=') {
                for word in line.split_whitespace() {
                    if let Some((k, v)) = word.split_once('=') {
                        kv.insert(
                            k.to_owned(),
                            v.parse().with_context(|| format!("{word:?}"))?,
                        );
                    }
                }
            } else if !line.is_empty() {
                samples.push(line.parse().with_context(|| format!("sample {line:?}"))?);
            }
        }
        Ok(Self { kv, samples })
    }
    fn get(&self, key: &str) -> Result<u64> {
        self.kv
            .get(key)
            .copied()
            .with_context(|| format!("the client did not report {key}"))
    }
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat: did the agent exit?"))?;
    // Fields after the command name, which may itself hold spaces: state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// VmRSS of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    rss(pid).map(|r| r.total)
}

/// A process's resident memory in KiB: `VmRSS` and the two parts that make it up here, anonymous
/// (heap, stacks) and file-backed (the binary's code and data as far as it was paged in). Heap
/// given back to the kernel leaves the first; code run once stays in the second.
#[derive(Clone, Copy)]
pub(crate) struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

impl Rss {
    /// "8.1 MiB (anon 3.7, file 4.4)".
    fn cell(self) -> String {
        format!(
            "{:.1} MiB (anon {:.1}, file {:.1})",
            mib(self.total),
            mib(self.anon),
            mib(self.file)
        )
    }
    fn json(self) -> Value {
        json!({"rss_kib": self.total, "anon_kib": self.anon, "file_kib": self.file})
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn rss(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status: did the agent exit?"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Rss {
        total: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

/// Percentile by rank on sorted samples (nearest rank).
fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// One line of the results table.
struct Row {
    scenario: String,
    metric: String,
    unit: &'static str,
    direct: f64,
    ferry: f64,
    /// The same figure through the reference relays, where measured.
    relays: Option<f64>,
    /// A target on ferry/direct: (`<=` or `>=`, bound).
    target: Option<(&'static str, f64)>,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ferry / self.direct
    }
    fn met(&self) -> Option<bool> {
        self.target.map(|(op, bound)| match op {
            "<=" => self.ratio() <= bound,
            _ => self.ratio() >= bound,
        })
    }
}

/// Raises RLIMIT_NOFILE as far as allowed and returns the limit. The bench's children (the pods'
/// processes, and the agents, which inherit their limit from us) need about one descriptor per held
/// connection, each agent two. Raising the hard limit needs CAP_SYS_RESOURCE, which a container may
/// lack: then the hard limit is what we get.
pub(crate) fn set_limits() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let want = libc::rlimit {
            rlim_cur: 262_144,
            rlim_max: 262_144,
        };
        if lim.rlim_max < want.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            lim = want;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_max)
}

fn progress(start: Instant, text: &str) {
    eprintln!("[bench {:>6.1}s] {text}", start.elapsed().as_secs_f64());
}

/// What to run.
#[derive(Clone)]
pub struct Options {
    pub quick: bool,
    pub out: Option<PathBuf>,
    /// Parts to run (`rr`, `churn`, `bulk`, `idle`, `pods`); empty: all.
    pub only: Vec<String>,
    /// Whether the agents use the same-node fast path.
    pub fast_path: bool,
    /// Whether request/response and bulk also run through the reference relays.
    pub reference: bool,
}

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

pub fn run(bins: &Bins, target_dir: &Path, opts: Options) -> Result<()> {
    let quick = opts.quick;
    let out = opts.out.clone();
    let started = Instant::now();
    let p = Params::new(quick);
    let out = out.unwrap_or_else(|| target_dir.join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // The load generator comes with the test app (the host's release build); the agent may not.
    let bin = bins.testapp.with_file_name("ferry-bench");
    if !bin.exists() {
        bail!(
            "{} is missing: the release build should have made it",
            bin.display()
        );
    }
    let nofile = set_limits()?;
    // Each agent holds one descriptor per proxied connection (the app's or the delivery socket),
    // and so does each end of the load generator; leave room for everything else.
    let fit = nofile.saturating_sub(256) as usize;
    let hold_note = if fit < p.hold_conns {
        format!(
            "{} connections do not fit RLIMIT_NOFILE {nofile} (the hard limit; raising it needs CAP_SYS_RESOURCE), at 1 descriptor per connection in each agent: measured {fit}.",
            p.hold_conns
        )
    } else {
        String::new()
    };
    let hold_conns = p.hold_conns.min(fit);
    // SAFETY: single-threaded at this point; the test world reads these to find the binaries.
    unsafe {
        std::env::set_var("FERRY_BIN", &bins.ferry);
        std::env::set_var("FERRY_TESTAPP", &bins.testapp);
    }
    progress(
        started,
        &format!(
            "building the test world; agents run {}",
            bins.ferry.display()
        ),
    );
    let mut b = setup(bin, opts.fast_path, opts.reference)?;
    // Memory of agents that have carried nothing yet, for comparison with idle after traffic.
    let fresh: Vec<Rss> = b.agents.iter().map(|a| rss(a.pid)).collect::<Result<_>>()?;
    progress(started, "world ready; request/response latency");
    let mut json_out = json!({
        "machine_at_start": machine(),
        "agent_binary": bins.ferry.display().to_string(),
        "quick": quick,
        "fast_path": opts.fast_path,
        "only": opts.only,
        "params": {
            "rr_round_trips_per_path": p.rr_rounds * p.rr_per_round,
            "churn_connections_per_path": p.churn_rounds * p.churn_per_round,
            "bulk_bytes_per_path": p.bulk_rounds as u64 * p.bulk_bytes_per_round,
        },
    });
    let mut rows = Vec::new();
    let mut cost = Vec::new();
    let mut curves = Vec::new();

    // Request/response on one persistent connection per round.
    for topo in parts(&opts, "rr") {
        let (mut cpu, mut requests) = ([0.0; 3], 0u64);
        for size in [1u64, KIB] {
            let mut samples = [Vec::new(), Vec::new(), Vec::new()];
            for round in 0..p.rr_rounds {
                for via in vias(round, opts.reference) {
                    let args = vec![
                        "rr".into(),
                        "--to".into(),
                        b.target(via, topo, ECHO),
                        "--size".into(),
                        size.to_string(),
                        "--count".into(),
                        p.rr_per_round.to_string(),
                        "--warmup".into(),
                        p.rr_warmup.to_string(),
                    ];
                    let c0 = b.carrier_cpu(via)?;
                    let o = b.client(via, &args, Duration::from_secs(120))?;
                    cpu[via as usize] += b.carrier_cpu(via)? - c0;
                    if via == Via::Ferry {
                        requests += (p.rr_per_round + p.rr_warmup) as u64;
                    }
                    samples[via as usize].extend(o.samples);
                }
            }
            for s in &mut samples {
                s.sort_unstable();
            }
            let scen = format!("RR {} {}", topo.name(), size_name(size));
            for (q, name) in [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")] {
                let target = match (topo, name) {
                    (Topo::Cross, "p50") => Some(("<=", 1.4)),
                    (Topo::Cross, "p99") => Some(("<=", 1.6)),
                    (Topo::Same, "p50") => Some(("<=", 1.2)),
                    _ => None,
                };
                rows.push(Row {
                    scenario: scen.clone(),
                    metric: name.into(),
                    unit: "µs",
                    direct: pct(&samples[0], q) / 1e3,
                    ferry: pct(&samples[1], q) / 1e3,
                    relays: opts.reference.then(|| pct(&samples[2], q) / 1e3),
                    target,
                });
            }
            curves.push((scen, samples));
        }
        // Every path ran the same number of requests.
        cost.push((
            format!("agent CPU s per 100k requests (RR {})", topo.name()),
            cpu[Via::Ferry as usize] / requests as f64 * 1e5,
        ));
        if opts.reference {
            cost.push((
                format!(
                    "reference relays' CPU s per 100k requests (RR {})",
                    topo.name()
                ),
                cpu[Via::Relays as usize] / requests as f64 * 1e5,
            ));
        }
    }
    progress(started, "connection churn");

    // Connection churn: connect, 1 KiB request/response, close, one after another.
    for topo in parts(&opts, "churn") {
        let (mut cpu, mut conns) = (0.0, 0u64);
        let mut elapsed = [0u64; 2];
        let mut samples = [Vec::new(), Vec::new()];
        for round in 0..p.churn_rounds {
            for via in order(round) {
                let args = vec![
                    "churn".into(),
                    "--to".into(),
                    b.target(via, topo, ECHO),
                    "--size".into(),
                    KIB.to_string(),
                    "--count".into(),
                    p.churn_per_round.to_string(),
                ];
                let c0 = b.agent_cpu()?;
                let o = b.client(via, &args, Duration::from_secs(300))?;
                if via == Via::Ferry {
                    cpu += b.agent_cpu()? - c0;
                    conns += p.churn_per_round as u64;
                }
                elapsed[via as usize] += o.get("elapsed_ns")?;
                samples[via as usize].extend(o.samples);
            }
        }
        for s in &mut samples {
            s.sort_unstable();
        }
        let n = (p.churn_rounds * p.churn_per_round) as f64;
        let scen = format!("churn {} 1 KiB", topo.name());
        rows.push(Row {
            scenario: scen.clone(),
            metric: "conn/s".into(),
            unit: "1/s",
            direct: n / (elapsed[0] as f64 / 1e9),
            ferry: n / (elapsed[1] as f64 / 1e9),
            relays: None,
            target: Some((">=", 0.5)),
        });
        rows.push(Row {
            scenario: scen,
            metric: "p99".into(),
            unit: "µs",
            direct: pct(&samples[0], 99.0) / 1e3,
            ferry: pct(&samples[1], 99.0) / 1e3,
            relays: None,
            target: None,
        });
        cost.push((
            format!("agent CPU s per 100k connections (churn {})", topo.name()),
            cpu / conns as f64 * 1e5,
        ));
    }
    progress(started, "bulk throughput");

    // Bulk: 1 and 8 streams into a sink.
    for topo in parts(&opts, "bulk") {
        let (mut cpu, mut bytes) = ([0.0; 3], 0u64);
        for streams in [1u32, 8] {
            let mut sum = [(0u64, 0u64); 3];
            for round in 0..p.bulk_rounds {
                for via in vias(round, opts.reference) {
                    let mut args = vec![
                        "bulk".into(),
                        "--to".into(),
                        b.target(via, topo, SINK),
                        "--streams".into(),
                        streams.to_string(),
                        "--bytes".into(),
                        p.bulk_bytes_per_round.to_string(),
                    ];
                    // The sink checks the stream offset in every word (see the sink's `--verify`).
                    if std::env::var_os("FERRY_BENCH_VERIFY").is_some() {
                        args.push("--verify".into());
                    }
                    let c0 = b.carrier_cpu(via)?;
                    let o = b.client(via, &args, Duration::from_secs(300))?;
                    let got = o.get("bytes")?;
                    cpu[via as usize] += b.carrier_cpu(via)? - c0;
                    if via == Via::Ferry {
                        bytes += got;
                    }
                    let s = &mut sum[via as usize];
                    s.0 += got;
                    s.1 += o.get("elapsed_ns")?;
                }
            }
            let gbps = |(bytes, ns): (u64, u64)| bytes as f64 * 8.0 / ns as f64;
            rows.push(Row {
                scenario: format!(
                    "bulk {} {streams} stream{}",
                    topo.name(),
                    if streams == 1 { "" } else { "s" }
                ),
                metric: "throughput".into(),
                unit: "Gbit/s",
                direct: gbps(sum[0]),
                ferry: gbps(sum[1]),
                relays: opts.reference.then(|| gbps(sum[2])),
                target: (streams == 1).then_some((">=", 0.6)),
            });
        }
        // Every path carried the same bytes (each client checks its sink's count).
        cost.push((
            format!("agent CPU s per GiB (bulk {})", topo.name()),
            cpu[Via::Ferry as usize] / (bytes as f64 / GIB),
        ));
        if opts.reference {
            cost.push((
                format!("reference relays' CPU s per GiB (bulk {})", topo.name()),
                cpu[Via::Relays as usize] / (bytes as f64 / GIB),
            ));
        }
    }
    if ["rr", "churn", "bulk"].iter().any(|p| opts.runs(p)) {
        check_paths(&b)?;
    }
    let mut conns = Section::skipped();
    if opts.runs("idle") {
        progress(started, "idle proxied connections");
        conns = hold_test(&b, hold_conns, &fresh)?;
        if !hold_note.is_empty() {
            conns.md.push_str(&format!("\n{hold_note}\n"));
            conns.json["note"] = json!(hold_note);
        }
    }
    let mut pods = Section::skipped();
    if opts.runs("pods") {
        progress(started, "memory per enrolled pod");
        pods = pod_scaling(&mut b, &p, started)?;
    }

    let mut table = render(&rows, &cost, &conns, &pods);
    if opts.fast_path {
        // What the kernel did for the same-node pairs: the figures behind the fast path's ratios,
        // and its checks (a fallback, a count that did not add up).
        let events = [
            "splice_redirected",
            "splice_passed",
            "splice_repeat_cut",
            "splice_checked",
            "splice_mismatched",
            "splice_refused",
            "splice_at_cap",
        ];
        let mut counts = serde_json::Map::new();
        let mut line = String::from("\nFast path, node n1's agent:");
        for e in events {
            let n =
                b.n1.metric("ferry_capture_events_total", &[("event", e)])
                    .unwrap_or(f64::NAN);
            let _ = write!(line, " {e} {n}");
            counts.insert(e.into(), json!(n));
        }
        let _ = writeln!(table, "{line}");
        json_out["fast_path_events"] = Value::Object(counts);
    }
    // Whether the agent's code is laid out as profiled: without it an idle agent maps megabytes more.
    let layout =
        crate::workspace_root().and_then(|root| crate::link_order::coverage(&root, &bins.ferry));
    match &layout {
        Ok((present, listed)) => {
            let _ = writeln!(
                table,
                "\nAgent binary {}: {present} of the {listed} functions of {} in it (placed together by the linker).",
                bins.ferry.display(),
                crate::link_order::FILE
            );
            json_out["link_order"] = json!({"listed": listed, "in_binary": present});
        }
        Err(e) => {
            let _ = writeln!(
                table,
                "\nAgent binary {}: its code layout is unknown ({e:#}).",
                bins.ferry.display()
            );
        }
    }
    println!("{table}");
    let chart = svg(&curves);
    std::fs::write(out.join("latency.svg"), chart)?;
    json_out["results"] = rows
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario, "metric": r.metric, "unit": r.unit,
                "direct": r.direct, "ferry": r.ferry, "ratio": r.ratio(),
                "target": r.target.map(|(op, v)| format!("{op} {v}")), "met": r.met(),
                "relays": r.relays, "ferry_per_relays": r.relays.map(|v| r.ferry / v),
            })
        })
        .collect();
    json_out["cost"] = cost
        .iter()
        .map(|(k, v)| json!({"what": k, "value": v}))
        .collect();
    json_out["idle_connections"] = conns.json.clone();
    json_out["pods"] = pods.json.clone();
    json_out["latency_percentiles_us"] = curves
        .iter()
        .map(|(name, s)| {
            let pts = |s: &[u64]| -> Vec<Value> {
                CURVE.iter().map(|&q| json!([q, pct(s, q) / 1e3])).collect()
            };
            json!({
                "scenario": name, "direct": pts(&s[0]), "ferry": pts(&s[1]),
                "relays": pts(&s[2]),
            })
        })
        .collect();
    json_out["machine_at_end"] = machine();
    json_out["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&json_out)?,
    )?;
    std::fs::write(out.join("bench.md"), &table)?;
    progress(
        started,
        &format!(
            "done; bench.json, bench.md and latency.svg in {}; tearing down",
            out.display()
        ),
    );
    // Agents stop the way a node stops them (SIGTERM, drain, exit): a profiler wrapped around them
    // (`cargo xtask link-order`) writes what they ran last only when they exit.
    stop_agents(&b.agents);
    drop(b);
    eprintln!("bench: {:.1} s in all", started.elapsed().as_secs_f64());
    Ok(())
}

/// ABBA: each path goes first every other round.
fn order(round: usize) -> [Via; 2] {
    if round.is_multiple_of(2) {
        [Via::Direct, Via::Ferry]
    } else {
        [Via::Ferry, Via::Direct]
    }
}

/// The paths of a round: direct and Ferry in ABBA order, or with the reference relays each of the
/// three first, second and last in turn.
fn vias(round: usize, reference: bool) -> Vec<Via> {
    if !reference {
        return order(round).to_vec();
    }
    let mut v = vec![Via::Direct, Via::Ferry, Via::Relays];
    v.rotate_left(round % 3);
    v
}

fn size_name(size: u64) -> String {
    if size >= KIB {
        format!("{} KiB", size / KIB)
    } else {
        format!("{size} B")
    }
}

fn setup(bin: PathBuf, fast_path: bool, reference: bool) -> Result<Bench> {
    let mut world = World::new()?;
    let n1 = world.add_node("n1", 1, true)?;
    let n2 = world.add_node("n2", 2, true)?;
    if fast_path {
        for n in [&n1, &n2] {
            world.write_config(
                n,
                &NodeOptions {
                    extra: "capture: {fast_path: true}\n".into(),
                    ..NodeOptions::default()
                },
            )?;
        }
    }
    let mesh = Trio {
        client: world.add_pod_as(&n1, "mc", 10, "bench", "client")?,
        local: world.add_pod_as(&n1, "ml", 20, "bench", "server")?,
        remote: world.add_pod_as(&n2, "mr", 30, "bench", "server")?,
    };
    // Same nodes, same bridges: only the enrollment differs.
    let plain = Trio {
        client: world.add_pod_as(&n1, "pc", 11, "bench", "client")?,
        local: world.add_pod_as(&n1, "pl", 21, "bench", "server")?,
        remote: world.add_pod_as(&n2, "pr", 31, "bench", "server")?,
    };
    for pod in [&mesh.client, &plain.client] {
        // Churn opens tens of thousands of connections from one address: reuse TIME_WAIT ports.
        for (k, v) in [
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.ip_local_port_range", "1024 65000"),
        ] {
            sh(&[
                "ip",
                "netns",
                "exec",
                &pod.netns,
                "sysctl",
                "-qw",
                &format!("{k}={v}"),
            ])?;
        }
    }
    for n in [&n1, &n2] {
        world.write_workloads(n, &[&mesh.client, &mesh.local, &mesh.remote])?;
    }
    let agents = vec![world.start_agent(&n1)?, world.start_agent(&n2)?];
    for (a, want) in agents.iter().zip([2, 1]) {
        wait_enrolled(a, want, Duration::from_secs(20))?;
    }
    for pod in [&mesh.local, &mesh.remote, &plain.local, &plain.remote] {
        let mut cmd = pod.command(&bin);
        cmd.args([
            "serve",
            "--echo",
            &ECHO.to_string(),
            "--sink",
            &SINK.to_string(),
            "--hold",
            &HOLD.to_string(),
        ]);
        // Checks every bulk byte against what was sent (costs the sink CPU, so off by default).
        if std::env::var_os("FERRY_BENCH_VERIFY").is_some() {
            cmd.arg("--verify");
        }
        let srv = world.spawn(cmd, &format!("serve-{}", pod.name))?;
        srv.wait_for_output("listening", Duration::from_secs(5))?;
    }
    // The reference relays: where the agents' sockets are, on the plain pods' path.
    let mut relays = Vec::new();
    let pods = if reference {
        vec![
            (&plain.client, relay_pairs_client(&plain)),
            (&plain.remote, relay_pairs_remote(&plain)),
        ]
    } else {
        Vec::new()
    };
    for (pod, pairs) in pods {
        let mut cmd = pod.command(&bin);
        cmd.arg("relay").args(pairs);
        let r = world.spawn(cmd, &format!("relay-{}", pod.name))?;
        r.wait_for_output("listening", Duration::from_secs(5))?;
        relays.push(r.pid);
    }
    Ok(Bench {
        world,
        bin,
        mesh,
        plain,
        agents,
        relays,
        n1,
    })
}

/// The client pod's relay: from its loopback (where the agent's outbound listener is for a mesh pod)
/// to the remote pod's relay across nodes, and straight to the local server on the same node.
fn relay_pairs_client(plain: &Trio) -> Vec<String> {
    let mut pairs = Vec::new();
    for port in [ECHO, SINK] {
        pairs.push(format!(
            "127.0.0.1:{}={}:{}",
            port + RELAY_CROSS,
            plain.remote.ip4,
            port + RELAY_CROSS
        ));
        pairs.push(format!(
            "127.0.0.1:{}={}:{port}",
            port + RELAY_SAME,
            plain.local.ip4
        ));
    }
    pairs
}

/// The remote pod's relay: from its pod address (where the agent's inbound socket is for a mesh pod)
/// to its server, as the agent delivers.
fn relay_pairs_remote(plain: &Trio) -> Vec<String> {
    [ECHO, SINK]
        .iter()
        .map(|port| {
            format!(
                "{ip}:{}={ip}:{port}",
                port + RELAY_CROSS,
                ip = plain.remote.ip4
            )
        })
        .collect()
}

fn enrolled(a: &Agent) -> usize {
    a.lines()
        .iter()
        .filter(|l| l.msg() == "pod enrolled")
        .count()
}

fn wait_enrolled(a: &Agent, want: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = enrolled(a);
        if n >= want {
            return Ok(());
        }
        if Instant::now() > deadline || !Path::new(&format!("/proc/{}", a.pid)).exists() {
            let errors: Vec<String> = a
                .lines()
                .iter()
                .filter(|l| l.msg().contains("cannot enroll"))
                .take(3)
                .map(|l| l.0.to_string())
                .collect();
            bail!(
                "agent on {} enrolled {n} of {want} pods in {timeout:?}; first errors: {errors:?}",
                a.node
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The Ferry rounds went through the agents (HBONE and same-node routes in the access log) and the
/// direct rounds did not (no log line names a plain pod).
fn check_paths(b: &Bench) -> Result<()> {
    let lines = b.agents[0].access_lines();
    for route in ["hbone", "same-node"] {
        if !lines
            .iter()
            .any(|l| l.field("route").as_deref() == Some(route))
        {
            bail!("no {route} connection in node 1's access log: the Ferry path was not measured");
        }
    }
    let plain: Vec<String> = [&b.plain.client, &b.plain.local, &b.plain.remote]
        .iter()
        .map(|p| p.ip4.to_string())
        .collect();
    for a in &b.agents {
        for l in a.access_lines() {
            let text = l.0.to_string();
            if plain.iter().any(|ip| text.contains(&format!("\"{ip}:"))) {
                bail!("the agent on {} saw direct traffic: {text}", a.node);
            }
        }
    }
    Ok(())
}

struct Section {
    md: String,
    json: Value,
}

impl Section {
    /// A part left out with `--only`.
    fn skipped() -> Self {
        Self {
            md: String::new(),
            json: Value::Null,
        }
    }
}

/// The topologies a part runs on: both, or none when `--only` leaves it out.
fn parts(opts: &Options, part: &str) -> Vec<Topo> {
    if opts.runs(part) {
        vec![Topo::Cross, Topo::Same]
    } else {
        Vec::new()
    }
}

/// Agent memory with idle proxied connections open across nodes, and after they close.
fn hold_test(b: &Bench, n: usize, fresh: &[Rss]) -> Result<Section> {
    let idle: Vec<Rss> = b.agents.iter().map(|a| rss(a.pid)).collect::<Result<_>>()?;
    let mut cmd = b.mesh.client.command(&b.bin);
    cmd.args([
        "hold",
        "--to",
        &b.target(Via::Ferry, Topo::Cross, HOLD),
        "--count",
        &n.to_string(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = Kill(cmd.spawn().context("starting the hold client")?);
    let stdout = child.0.stdout.take().context("hold client stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let opened = Output::parse(&first)?;
    if opened.kv.get("open").copied() != Some(n as u64) {
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("the hold client did not open {n} connections: {first:?} {err}");
    }
    // Let the agents settle (buffers, pools) before reading memory.
    std::thread::sleep(Duration::from_secs(2));
    let open: Vec<u64> = b
        .agents
        .iter()
        .map(|a| rss_kib(a.pid))
        .collect::<Result<_>>()?;
    drop(child.0.stdin.take());
    let closed = lines.next().transpose()?.unwrap_or_default();
    if closed.trim() != "closed" {
        bail!("the hold client did not close cleanly: {closed:?}");
    }
    let _ = child.0.wait();
    // The close crosses both agents and the server's reaper (200 ms ticks); the client agent's pool
    // then releases the spare HBONE connections of the burst after 5 s idle (checked every 1.25 s),
    // and both agents give the heap back 8 s after the connections closed.
    std::thread::sleep(Duration::from_secs(10));
    let after: Vec<Rss> = b.agents.iter().map(|a| rss(a.pid)).collect::<Result<_>>()?;
    let mut md = format!(
        "\n### {n} idle proxied connections (cross-node)\n\nopened in {:.1} s\n\n| agent | fresh RSS | idle RSS after traffic | with {n} open | per connection | 10 s after close | within 20 % of idle |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        opened.get("elapsed_ns")? as f64 / 1e9
    );
    let mut per_agent = Vec::new();
    for (i, a) in b.agents.iter().enumerate() {
        let per = (open[i] as f64 - idle[i].total as f64) / n as f64;
        let back = (after[i].total as f64) <= idle[i].total as f64 * 1.2;
        let _ = writeln!(
            md,
            "| {} ({}) | {} | {} | {:.1} MiB | {:.2} KiB (target <= 4 KB: {}) | {} | {} |",
            a.node,
            if i == 0 { "client side" } else { "server side" },
            fresh[i].cell(),
            idle[i].cell(),
            mib(open[i]),
            per,
            if per * 1.024 <= 4.0 { "met" } else { "MISSED" },
            after[i].cell(),
            if back { "yes" } else { "no" }
        );
        per_agent.push(json!({
            "node": a.node, "fresh_kib": fresh[i].total, "idle_kib": idle[i].total, "open_kib": open[i], "after_close_kib": after[i].total,
            "fresh": fresh[i].json(), "idle": idle[i].json(), "after_close": after[i].json(),
            "per_connection_kib": per, "back_within_20pct": back,
        }));
    }
    md.push_str("\nanon: heap and stacks; file: the pages of the agent binary it has run or read (they stay resident once touched).\n");
    Ok(Section {
        md,
        json: json!({"connections": n, "open_seconds": opened.get("elapsed_ns")? as f64 / 1e9, "agents": per_agent}),
    })
}

/// Kills the child on drop, so a failing bench leaves no client behind.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Agent RSS with 1, 100 and 1,000 enrolled idle pods on a node of their own.
fn pod_scaling(b: &mut Bench, p: &Params, started: Instant) -> Result<Section> {
    let n3 = b.world.add_node("n3", 3, false)?;
    let mut pods: Vec<Pod> = Vec::new();
    let mut create_time = grow(&mut b.world, &n3, &mut pods, p.pod_counts[0])?;
    b.world
        .write_workloads(&n3, &pods.iter().collect::<Vec<_>>())?;
    let agent = b.world.start_agent(&n3)?;
    let mut points = Vec::new();
    let mut note = String::new();
    for &want in &p.pod_counts {
        let mut want = want;
        if pods.len() < want {
            // Project from the pace so far; stop growing where the budget ends, and say so.
            let per = create_time.as_secs_f64() / pods.len().max(1) as f64;
            let left = p.pod_budget.as_secs_f64() - create_time.as_secs_f64();
            let fits = pods.len() + (left / per.max(1e-3)).max(0.0) as usize;
            if fits < want {
                let _ = writeln!(
                    note,
                    "\n{want} pods did not fit the pod-creation budget of {:?} (at {:.0} ms per pod); measured {fits} instead.",
                    p.pod_budget,
                    per * 1e3
                );
                want = fits;
            }
            if want <= pods.len() {
                continue;
            }
            create_time += grow(&mut b.world, &n3, &mut pods, want)?;
            b.world
                .write_workloads(&n3, &pods.iter().collect::<Vec<_>>())?;
        }
        let t = Instant::now();
        wait_enrolled(
            &agent,
            want,
            Duration::from_secs(30) + Duration::from_millis(200) * want as u32,
        )?;
        let enroll = t.elapsed();
        // Idle: let start-up work (certificates, listeners) finish before reading memory.
        std::thread::sleep(Duration::from_secs(2));
        let rss = rss_kib(agent.pid)?;
        progress(
            started,
            &format!(
                "{want} pods enrolled: RSS {:.1} MiB (created in {:.1} s so far)",
                rss as f64 / 1024.0,
                create_time.as_secs_f64()
            ),
        );
        points.push((want, rss, enroll));
    }
    let mut md = format!(
        "\n### Agent RSS by enrolled pods (idle)\n\npods created in {:.1} s ({:.0} ms per pod: netns, veth, addresses, routes, cgroups)\n\n| enrolled pods | RSS | enrolled in |\n| --- | --- | --- |\n",
        create_time.as_secs_f64(),
        create_time.as_secs_f64() * 1e3 / pods.len().max(1) as f64
    );
    for (n, rss, enroll) in &points {
        let _ = writeln!(
            md,
            "| {n} | {:.1} MiB | {:.1} s |",
            *rss as f64 / 1024.0,
            enroll.as_secs_f64()
        );
    }
    let (first, last) = (points[0], points[points.len() - 1]);
    let per_pod = if last.0 > first.0 {
        (last.1 as f64 - first.1 as f64) / (last.0 - first.0) as f64
    } else {
        f64::NAN
    };
    // The target is 8 MB + 20 KB per pod; KB here as 1000 bytes, RSS in KiB.
    let base_kb = first.1 as f64 * 1.024;
    let _ = writeln!(
        md,
        "\nbase (1 pod) {:.1} MB (target <= 8 MB: {}); per pod {:.1} KiB (target <= 20 KB: {}){note}",
        base_kb / 1000.0,
        if base_kb <= 8000.0 { "met" } else { "MISSED" },
        per_pod,
        if per_pod * 1.024 <= 20.0 {
            "met"
        } else {
            "MISSED"
        },
    );
    stop_agents(std::slice::from_ref(&agent));
    Ok(Section {
        md,
        json: json!({
            "create_seconds": create_time.as_secs_f64(),
            "points": points.iter().map(|(n, rss, e)| json!({"pods": n, "rss_kib": rss, "enroll_seconds": e.as_secs_f64()})).collect::<Vec<_>>(),
            "per_pod_kib": per_pod,
            "note": note.trim(),
        }),
    })
}

/// SIGTERM to every agent, then waits for each to exit (an agent that does not is killed on drop).
fn stop_agents(agents: &[Agent]) {
    for a in agents {
        if !a.terminate(Duration::from_secs(20)) {
            eprintln!("bench: agent {} did not exit within 20 s of SIGTERM", a.pid);
        }
    }
}

/// Adds idle pods to `node` until there are `upto`; returns how long it took.
fn grow(world: &mut World, n3: &Node, pods: &mut Vec<Pod>, upto: usize) -> Result<Duration> {
    let t = Instant::now();
    while pods.len() < upto {
        let i = pods.len();
        // 250 pods per /24: later pods use further subnets on the same node (idle pods need no
        // route, only their own addresses).
        let mut node = n3.clone();
        node.subnet = if i < 250 { 3 } else { 100 + (i / 250) as u8 };
        let pod = world.add_pod(&node, &format!("i{i}"), 2 + (i % 250) as u8)?;
        pods.push(pod);
    }
    Ok(t.elapsed())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = sh(&["uname", "-r"]).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let load = load.join(" ");
    json!({
        // Other work on the machine skews every figure (Ferry's more than direct TCP's: it needs more
        // threads scheduled per round trip); the load average says how busy it was.
        "loadavg": load,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": kernel.trim(),
    })
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn render(rows: &[Row], cost: &[(String, f64)], conns: &Section, pods: &Section) -> String {
    let m = machine();
    let mut md = format!(
        "## Ferry vs direct TCP\n\n{} × {}, kernel {}, load average at the end {}\n\n| scenario | metric | direct | Ferry | Ferry/direct | target | |\n| --- | --- | ---: | ---: | ---: | --- | --- |\n",
        m["nproc"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["loadavg"].as_str().unwrap_or("")
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {} {} | {:.2}x | {} | {} |",
            r.scenario,
            r.metric,
            fmt_num(r.direct),
            r.unit,
            fmt_num(r.ferry),
            r.unit,
            r.ratio(),
            r.target
                .map(|(op, v)| format!("{op} {v}x"))
                .unwrap_or_default(),
            match r.met() {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            }
        );
    }
    let reference: Vec<&Row> = rows.iter().filter(|r| r.relays.is_some()).collect();
    if !reference.is_empty() {
        md.push_str(
            "\n### Reference: plain relays in the agents' place\n\nThe plain pods through `ferry-bench relay` (two blocking threads per connection copying bytes; no TLS, no framing, no policy): one at each end across nodes, where it is about the least two proxies in the agents' place cost here. On the same node one relay in the client pod, whose second leg crosses the bridge where the agent delivers over the server pod's loopback: not a floor there.\n\n| scenario | metric | direct | relays | relays/direct | Ferry | Ferry/relays |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for r in reference {
            let relays = r.relays.unwrap_or(f64::NAN);
            let _ = writeln!(
                md,
                "| {} | {} | {} {u} | {} {u} | {:.2}x | {} {u} | {:.2}x |",
                r.scenario,
                r.metric,
                fmt_num(r.direct),
                fmt_num(relays),
                relays / r.direct,
                fmt_num(r.ferry),
                r.ferry / relays,
                u = r.unit,
            );
        }
    }
    md.push_str(
        "\n### Agent CPU (both agents, user + system)\n\n| what | value |\n| --- | ---: |\n",
    );
    for (k, v) in cost {
        let _ = writeln!(md, "| {k} | {} |", fmt_num(*v));
    }
    md.push_str(&conns.md);
    md.push_str(&pods.md);
    md
}

/// Percentiles drawn on the chart, spaced evenly on a log scale of 1/(1-p).
const CURVE: [f64; 15] = [
    0.0, 25.0, 50.0, 68.4, 75.0, 80.0, 90.0, 95.0, 96.8, 99.0, 99.5, 99.68, 99.8, 99.9, 99.95,
];

/// Latency percentile curves, direct vs Ferry vs the reference relays, one panel per scenario; SVG
/// written by hand.
fn svg(curves: &[(String, [Vec<u64>; 3])]) -> String {
    let (pw, ph, ml, mt, mb) = (440.0, 280.0, 60.0, 30.0, 40.0);
    let cols = 2;
    let rows = curves.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64, ph * rows as f64 + 30.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"14\">Round-trip latency percentiles: direct TCP (blue), Ferry (orange), plain relays in the agents' place (green, dashed)</text>\n"
    );
    let xmax = 1.0 / (1.0 - 0.9995_f64);
    let xpos = |q: f64| (1.0 / (1.0 - q / 100.0)).log10() / xmax.log10();
    for (i, (name, samples)) in curves.iter().enumerate() {
        let (ox, oy) = ((i % cols) as f64 * pw, 30.0 + (i / cols) as f64 * ph);
        let (iw, ih) = (pw - ml - 20.0, ph - mt - mb);
        // Log scale: medians of tens of microseconds and tails of milliseconds on one chart.
        let lo = samples.iter().map(|v| pct(v, 0.0)).fold(f64::MAX, f64::min) / 1e3 / 1.2;
        let hi = samples.iter().map(|v| pct(v, 99.95)).fold(1.0, f64::max) / 1e3 * 1.2;
        let (lo, hi) = (lo.clamp(0.1, hi / 2.0).log10(), hi.log10());
        let ypos = |us: f64| ((us.max(1e-3).log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\">{name}</text>",
            ox + ml,
            oy + 18.0
        );
        let (x0, y0) = (ox + ml, oy + mt);
        let _ = writeln!(
            s,
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{iw}\" height=\"{ih}\" fill=\"none\" stroke=\"#888\"/>"
        );
        for q in [0.0, 50.0, 90.0, 99.0, 99.9] {
            let x = x0 + xpos(q) * iw;
            let _ = writeln!(
                s,
                "<line x1=\"{x:.1}\" y1=\"{y0}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">p{q}</text>",
                y0 + ih,
                y0 + ih + 14.0
            );
        }
        for v in [
            1.0_f64, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4,
        ] {
            let f = v.log10();
            if f < lo || f > hi {
                continue;
            }
            let y = y0 + ih - ypos(v) * ih;
            let _ = writeln!(
                s,
                "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v} µs</text>",
                x0 + iw,
                x0 - 4.0,
                y + 4.0
            );
        }
        for (samples, (color, dash)) in samples
            .iter()
            .zip([("#1f77b4", ""), ("#ff7f0e", ""), ("#2ca02c", "5,3")])
            .filter(|(s, _)| !s.is_empty())
        {
            let pts: Vec<String> = CURVE
                .iter()
                .map(|&q| {
                    let y = y0 + ih - ypos(pct(samples, q) / 1e3) * ih;
                    format!("{:.1},{:.1}", x0 + xpos(q) * iw, y)
                })
                .collect();
            let _ = writeln!(
                s,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>",
                pts.join(" ")
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
