//! `cargo xtask bench --stress N`: the bench's parts run N times beside a CPU hog, every bulk byte
//! checked, failing on any byte lost, duplicated or unaccounted.
//!
//! A hog (one busy loop per CPU at the lowest priority) is what makes a quiet VM's TCP resend bytes
//! the receiver already has, sometimes together with new ones — the case the same-node fast path's
//! guard exists for — so this is the run a change to the fast path must pass.
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    Bins,
    bench::{self, Options},
};

/// Busy loops at nice 19, one per CPU, until dropped.
struct Hog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Hog {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        let threads = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // SAFETY: plain syscalls on the calling thread; a failure leaves it at the
                    // default priority, which still hogs.
                    unsafe {
                        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One stressed round: whether it completed (every checked byte intact) and node n1's fast-path
/// events, when the round got as far as writing them.
struct Round {
    error: Option<String>,
    events: Option<serde_json::Map<String, Value>>,
}

impl Round {
    fn event(&self, name: &str) -> Option<u64> {
        self.events.as_ref()?.get(name)?.as_f64().map(|v| v as u64)
    }

    fn failed(&self) -> bool {
        self.error.is_some() || self.event("splice_mismatched").unwrap_or(0) > 0
    }
}

pub fn run(bins: &Bins, target_dir: &Path, opts: Options, rounds: u32) -> Result<()> {
    if rounds == 0 {
        bail!("--stress needs at least one round");
    }
    let out = opts.out.clone().unwrap_or_else(|| target_dir.join("bench"));
    // SAFETY: no other thread runs yet. The bulk sinks read the first to check every byte; the
    // second keeps each round's test world logs, and those of rounds that passed are removed.
    unsafe {
        std::env::set_var("FERRY_BENCH_VERIFY", "1");
        std::env::set_var("FERRY_KEEP_LOGS", "1");
    }
    let hog = Hog::start();
    let mut done = Vec::new();
    for i in 1..=rounds {
        let json = out.join("bench.json");
        let _ = std::fs::remove_file(&json);
        let before = world_dirs();
        let error = bench::run(bins, target_dir, opts.clone())
            .err()
            .map(|e| format!("{e:#}"));
        let kept: Vec<_> = world_dirs().difference(&before).cloned().collect();
        let events = std::fs::read_to_string(&json)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("fast_path_events")?.as_object().cloned());
        let round = Round { error, events };
        if round.failed() {
            // Out of the temp dir: the next test world's sweep removes what a finished process
            // left there.
            for d in &kept {
                let to = out.join(format!("round-{i}"));
                match keep(d, &to) {
                    Ok(()) => {
                        eprintln!("stress round {i}: its agents' logs are in {}", to.display())
                    }
                    Err(e) => eprintln!(
                        "stress round {i}: its agents' logs are in {} ({e:#})",
                        d.display()
                    ),
                }
            }
        } else {
            for d in &kept {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        eprintln!(
            "stress round {i}/{rounds}: {}; fast path: mismatched {}, repeated heads cut {}, fallbacks {}",
            round
                .error
                .as_deref()
                .unwrap_or("every checked byte intact"),
            show(round.event("splice_mismatched")),
            show(round.event("splice_repeat_cut")),
            show(round.event("splice_passed")),
        );
        done.push(round);
    }
    drop(hog);
    let failed = done.iter().filter(|r| r.failed()).count();
    let sum = |name| done.iter().filter_map(|r| r.event(name)).sum::<u64>();
    println!(
        "\nStress: {rounds} rounds beside a CPU hog, {failed} failed; fast path: {} mismatched, {} repeated heads cut, {} fallbacks",
        sum("splice_mismatched"),
        sum("splice_repeat_cut"),
        sum("splice_passed"),
    );
    if failed > 0 {
        let first = done
            .iter()
            .position(Round::failed)
            .context("a failed round")?;
        bail!(
            "{failed} of {rounds} stressed rounds failed (the first: round {}: {})",
            first + 1,
            done[first]
                .error
                .as_deref()
                .unwrap_or("a fast-path byte count did not add up (the agent logged which)")
        );
    }
    Ok(())
}

/// The test worlds' directories in the temp dir (logs, configs), by the harness's name prefix.
/// Moves a kept test world's logs to `to`.
fn keep(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("cp -a {} {}: {status}", from.display(), to.display());
    }
    std::fs::remove_dir_all(from).with_context(|| format!("removing {}", from.display()))
}

fn world_dirs() -> std::collections::BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(ferry_e2e::PREFIX)
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn show(n: Option<u64>) -> String {
    n.map_or_else(|| "-".into(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(error: Option<&str>, events: Option<Value>) -> Round {
        Round {
            error: error.map(str::to_owned),
            events: events.and_then(|v| v.as_object().cloned()),
        }
    }

    #[test]
    fn a_round_fails_on_an_error_or_a_byte_count_that_did_not_add_up() {
        let clean = serde_json::json!({"splice_mismatched": 0.0, "splice_repeat_cut": 2.0});
        assert!(!round(None, Some(clean.clone())).failed());
        // Without the fast path there are no events: the byte check alone decides.
        assert!(!round(None, None).failed());
        assert!(round(Some("bulk stream 3 differs at byte 7"), Some(clean)).failed());
        let mismatch = serde_json::json!({"splice_mismatched": 1.0});
        let r = round(None, Some(mismatch));
        assert!(r.failed());
        assert_eq!(r.event("splice_mismatched"), Some(1));
        assert_eq!(r.event("splice_repeat_cut"), None);
    }
}
