//! `cargo xtask`: the project's own commands. Every command first runs `setup`, which is idempotent.
mod bench;
mod demo;
mod deploy_check;
mod image;
mod link_order;
mod setup;
mod soak;
mod stress;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check prerequisites and install the eBPF toolchain (rust-src, bpf-linker) into .tools/.
    Setup,
    /// Build the agent (with its eBPF object) and the test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the whole test suite: formatting, lints, unit tests and end-to-end tests on the kernel.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the local two-node demo.
    Demo,
    /// Build the agent's container image (static binary, FROM scratch) into an OCI archive and check it.
    Image,
    /// Validate the Kubernetes manifests in deploy/ (kubernetes-validate, checkov).
    DeployCheck,
    /// Benchmark Ferry against direct TCP (latency, churn, bulk, cost, memory); see xtask/src/bench.rs.
    Bench {
        /// A smoke run (under a minute) that produces every figure from far fewer samples.
        #[arg(long)]
        quick: bool,
        /// Where bench.json, bench.md and latency.svg go (default: <target dir>/bench).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run only these parts (comma-separated): rr, churn, bulk, idle, pods.
        #[arg(long, value_delimiter = ',', value_parser = ["rr", "churn", "bulk", "idle", "pods"])]
        only: Vec<String>,
        /// Agents with the same-node fast path on (capture.fast_path: true; off by default), for
        /// before/after.
        #[arg(long)]
        fast_path: bool,
        /// Run the parts this many times beside a CPU hog, checking every bulk byte; fails on any
        /// byte lost, duplicated or unaccounted (the run a fast-path change must pass).
        #[arg(long, value_name = "ROUNDS")]
        stress: Option<u32>,
    },
    /// Profile the agent under callgrind and rewrite agent/link-order.txt, the functions the linker
    /// places together (needs valgrind); after a toolchain or dependency update.
    LinkOrder,
    /// Many concurrent connections through one pair of agents, bytes checked, agent memory measured.
    Soak {
        /// Concurrent connections (the test suite runs 3,000).
        #[arg(long, default_value_t = 10_000)]
        conns: u32,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    setup::setup(&root)?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Build { release } => build(&root, release).map(drop),
        Cmd::Test { no_lint, args } => test(&root, no_lint, &args),
        Cmd::Demo => {
            let bins = build(&root, true)?;
            demo::run(&bins)
        }
        Cmd::Image => image::run(&root).map(drop),
        Cmd::DeployCheck => deploy_check::run(&root),
        Cmd::Bench {
            quick,
            out,
            only,
            fast_path,
            stress,
        } => {
            let opts = bench::Options {
                quick,
                out,
                only,
                fast_path,
                // A stress run checks Ferry's bytes; the reference would only lengthen it.
                reference: stress.is_none(),
            };
            match stress {
                Some(rounds) => stress::run(&bench_bins(&root)?, &target_dir(&root), opts, rounds),
                None => bench::run(&bench_bins(&root)?, &target_dir(&root), opts),
            }
        }
        Cmd::LinkOrder => link_order::run(&root),
        Cmd::Soak { conns } => soak::run(&bench_bins(&root)?, conns),
    }
}

pub fn workspace_root() -> Result<PathBuf> {
    xtask_dir()
        .parent()
        .map(Path::to_owned)
        .context("xtask has no parent directory")
}

/// This crate's directory in the checkout `cargo xtask` was run from. `cargo run` says so at run time;
/// the path compiled in is only a fallback: checkouts sharing one target directory share one xtask
/// executable, and one built in another checkout would otherwise build and test that checkout.
pub fn xtask_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `cargo` with the project's tools on PATH.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    let tools = setup::tools_dir(root).join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools];
    paths.extend(std::env::split_paths(&path));
    if let Ok(p) = std::env::join_paths(paths) {
        cmd.env("PATH", p);
    }
    cmd
}

pub fn status(mut cmd: Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Where cargo puts binaries of the given profile.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

#[derive(Clone)]
pub struct Bins {
    pub ferry: PathBuf,
    pub testapp: PathBuf,
}

fn build(root: &Path, release: bool) -> Result<Bins> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    status(cmd)?;
    let dir = target_dir(root).join(if release { "release" } else { "debug" });
    Ok(Bins {
        ferry: dir.join("ferry"),
        testapp: dir.join("ferry-testapp"),
    })
}

/// The bench's and the soak's binaries: the agent as the image ships it (static; its memory is the one
/// a node sees) unless `FERRY_BENCH_AGENT` names another build, the load generator and test app from
/// the host's release build.
fn bench_bins(root: &Path) -> Result<Bins> {
    let ferry = match std::env::var_os("FERRY_BENCH_AGENT") {
        Some(path) => PathBuf::from(path),
        None => image::build_static(root)?,
    };
    // Only the test crate's binaries: the host's own `ferry` would be one more LTO link for nothing.
    let mut cmd = cargo(root);
    cmd.args(["build", "--release", "--bins", "-p", "ferry-e2e"]);
    status(cmd)?;
    Ok(Bins {
        ferry,
        testapp: target_dir(root).join("release").join("ferry-testapp"),
    })
}

/// The fuzz targets (`agent/fuzz/fuzz_targets`) and how long each runs in the test suite: 60 s in all.
const FUZZ_TARGETS: [(&str, &str, u32); 4] = [
    ("policy_parse", "the policy parser", 15),
    ("hbone_request", "the HBONE CONNECT validation", 15),
    ("node_config", "the node config parser", 15),
    ("workloads", "the workloads file parser", 15),
];

/// A bounded run of each fuzz target (nightly, libFuzzer), from its seeds and the corpus earlier runs
/// kept; a crash fails the suite.
fn fuzz_smoke(root: &Path) -> Result<()> {
    for (target, what, seconds) in FUZZ_TARGETS {
        fuzz_one(root, target, what, seconds)?;
    }
    Ok(())
}

fn fuzz_one(root: &Path, target: &str, what: &str, seconds: u32) -> Result<()> {
    let mut fuzz = Command::new("cargo");
    fuzz.current_dir(root.join("agent"))
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    if let Some(path) = cargo(root)
        .get_envs()
        .find(|(k, _)| *k == "PATH")
        .and_then(|(_, v)| v)
    {
        fuzz.env("PATH", path);
    }
    let corpus = target_dir(root).join("fuzz-corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    fuzz.args(["+nightly", "fuzz", "run", target, "--target-dir"])
        .arg(target_dir(root).join("fuzz"))
        .arg(&corpus)
        .arg(Path::new("fuzz/seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"));
    // libFuzzer reports every new input; keep the log short unless something breaks.
    let out = fuzz.output().context("running cargo fuzz")?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        if log.contains("failed to build fuzz script") {
            bail!(
                "building the fuzz target {target} failed ({}): see the compiler's errors above",
                out.status
            );
        }
        bail!(
            "fuzzing {what} failed ({}); the crashing input is under agent/fuzz/artifacts/{target}/: add it as a unit test",
            out.status
        );
    }
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("Done") || l.contains("cov:"))
        .unwrap_or("");
    eprintln!("xtask: fuzzed {what} for {seconds} s: {last}");
    Ok(())
}

fn test(root: &Path, no_lint: bool, args: &[String]) -> Result<()> {
    if !no_lint {
        let mut fmt = cargo(root);
        fmt.args(["fmt", "--all", "--", "--check"]);
        status(fmt).context("formatting differs: run `cargo fmt --all`")?;
        let mut clippy = cargo(root);
        clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
        status(clippy)?;
        // The eBPF crate only builds for the BPF target, with nightly.
        let mut ebpf = cargo(root);
        // The rustup proxy, not the stable toolchain's cargo that runs xtask: it understands `+nightly`.
        ebpf.env_remove("RUSTC").env_remove("RUSTUP_TOOLCHAIN");
        let mut ebpf = {
            let mut c = Command::new("cargo");
            c.current_dir(root.join("ebpf"));
            for (k, v) in ebpf.get_envs() {
                if let Some(v) = v {
                    c.env(k, v);
                } else {
                    c.env_remove(k);
                }
            }
            c
        };
        ebpf.args([
            "+nightly",
            "clippy",
            "--package",
            "ferry-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
        status(ebpf)?;
    }
    let bins = build(root, false)?;
    fuzz_smoke(root)?;
    let mut t = cargo(root);
    t.arg("test")
        .args(args)
        .env("FERRY_BIN", &bins.ferry)
        .env("FERRY_TESTAPP", &bins.testapp);
    status(t)?;
    // The install: manifests validated and scanned, the container image built and its binary run.
    // Only for the whole suite, not a filtered run.
    if args.is_empty() {
        deploy_check::run(root)?;
        let shipped = image::run(root)?;
        link_order::check(root, &shipped)?;
        let shipped_bins = bench_bins(root)?;
        // A smoke run: every scenario must produce numbers; how fast they are is not asserted.
        let opts = bench::Options {
            quick: true,
            out: None,
            only: Vec::new(),
            // The agents' default; the fast path has its own end-to-end tests.
            fast_path: false,
            reference: true,
        };
        bench::run(&shipped_bins, &target_dir(root), opts)?;
        // The soak at under a third of its full size: every connection must come back intact, and
        // at 3,000 the per-connection memory figure is steady enough to hold to its 4 KB bound
        // (at 1,000 it moved by up to 1,000 B between runs).
        soak::run(&shipped_bins, 3_000)?;
    }
    Ok(())
}
