//! `cargo xtask link-order`: the functions an agent runs, listed for the linker to place together.
//!
//! The agent's binary holds about 11 MB of code, of which an agent runs about 2.5 MB. The kernel maps
//! a binary's pages around each page fault (64 KiB windows, `fault_around_bytes`), so code run at
//! start-up but scattered over all of `.text` kept 5.9 MB of it resident in an idle agent. lld puts the
//! functions listed in `agent/link-order.txt` first, in the file's order (`--symbol-ordering-file`,
//! passed by `agent/build.rs`), so those pages are the ones mapped.
//!
//! The list comes from callgrind: the bench's own world runs with every agent under valgrind, first
//! start-up and enrolment (the bench's `pods` part), then traffic (`rr`, `churn`, `bulk`, `idle`);
//! what runs once the agents are told to stop comes last. Symbol names are mangled with hashes that
//! change with the toolchain, the dependencies' versions and the build flags, so the list is taken
//! from the static build the image ships, and `cargo xtask test` fails once more than a quarter of it
//! no longer names functions of that build (see [`check`]).
use std::{
    collections::HashSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use object::{Object, ObjectSymbol, SymbolKind};

use crate::{bench, image::TempDir};

/// The list, relative to the workspace root.
pub const FILE: &str = "agent/link-order.txt";

/// Below this share of listed functions present in the agent binary, the list is called stale.
const FRESH_ENOUGH: f64 = 0.75;

/// Profiles the image's agent binary under callgrind and rewrites [`FILE`].
pub fn run(root: &Path) -> Result<()> {
    let valgrind = Command::new("valgrind").arg("--version").output();
    if !matches!(&valgrind, Ok(o) if o.status.success()) {
        bail!(
            "valgrind is not installed (Debian: apt install valgrind): the list is taken with callgrind"
        );
    }
    let bins = crate::bench_bins(root)?;
    let agent = bins.ferry.clone();
    let dir = TempDir::new("ferry-link-order")?;
    let mut phases = Vec::new();
    for (phase, parts) in [
        ("start", &["pods"][..]),
        ("traffic", &["rr", "churn", "bulk", "idle"][..]),
    ] {
        let wrapper = dir.0.join(format!("agent-{phase}"));
        write_wrapper(&wrapper, &agent, &dir.0.join(phase))?;
        eprintln!(
            "xtask: link-order: {phase} ({}), agents under callgrind: the bench's figures below are meaningless as speed",
            parts.join(", ")
        );
        let mut wrapped = bins.clone();
        wrapped.ferry = wrapper;
        bench::run(
            &wrapped,
            &dir.0.join(format!("bench-{phase}")),
            bench::Options {
                quick: true,
                out: Some(dir.0.join(format!("bench-{phase}"))),
                only: parts.iter().map(|p| p.to_string()).collect(),
                fast_path: false,
                // Only the agents are profiled.
                reference: false,
            },
        )?;
        phases.push((phase, profiles(&dir.0, phase)?));
    }
    let defined = text_symbols(&agent)?;
    // What each phase ran, and apart from it what the agents ran once told to stop: shutdown code
    // runs once, at the end, and must not sit among the pages an idle agent keeps mapped.
    let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
    let mut stopping = Vec::new();
    for (phase, processes) in &phases {
        let mut ran = Vec::new();
        for files in processes {
            // From the dump the stop signal's handler is in on, what ran first is shutdown's (that
            // dump also holds what ran just before the signal, which ran in earlier dumps too).
            let mut stopped = false;
            for file in files {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let names = functions_run(&text);
                stopped = stopped || names.iter().any(|n| n.starts_with(STOP_HANDLER));
                if stopped {
                    stopping.extend(names);
                } else {
                    ran.extend(names);
                }
            }
        }
        ensure!(
            !ran.is_empty(),
            "callgrind recorded no function of the agent in the {phase} phase"
        );
        sections.push((phase, ran));
    }
    sections.push(("stop", stopping));
    let mut seen = HashSet::new();
    let mut out = String::from(HEADER);
    for (section, ran) in &sections {
        // Sorted: the order inside a section does not matter to what is mapped, and a sorted list
        // changes only where the profile did when it is taken again.
        let mut listed: Vec<String> = with_ifunc_siblings(ran, &defined)
            .into_iter()
            .filter(|name| defined.contains(name) && seen.insert(name.clone()))
            .collect();
        listed.sort();
        let _ = writeln!(out, "# {section}");
        for name in listed {
            let _ = writeln!(out, "{name}");
        }
    }
    let path = root.join(FILE);
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "xtask: link-order: {} functions in {}",
        seen.len(),
        path.display()
    );
    Ok(())
}

const HEADER: &str = "\
# Functions the agent runs, in the order lld places them at the front of .text (agent/build.rs).
# Generated by `cargo xtask link-order` from callgrind profiles of the static build; do not edit.
";

/// How many of the listed functions the binary defines, of how many listed.
pub fn coverage(root: &Path, binary: &Path) -> Result<(usize, usize)> {
    let path = root.join(FILE);
    let list =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let defined = text_symbols(binary)?;
    let listed: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let present = listed.iter().filter(|n| defined.contains(**n)).count();
    Ok((present, listed.len()))
}

/// Fails when the list has gone stale for `binary` (the static build), naming the fix.
pub fn check(root: &Path, binary: &Path) -> Result<()> {
    let (present, listed) = coverage(root, binary)?;
    let share = present as f64 / listed.max(1) as f64;
    ensure!(
        share >= FRESH_ENOUGH,
        "{FILE} is stale: {present} of its {listed} functions are in {} ({:.0} %, need {:.0} %); \
         an idle agent maps megabytes more of its code until `cargo xtask link-order` rewrites it",
        binary.display(),
        share * 100.0,
        FRESH_ENOUGH * 100.0
    );
    eprintln!(
        "xtask: {FILE}: {present} of {listed} functions in the agent binary ({:.0} %)",
        share * 100.0
    );
    Ok(())
}

/// A script that runs `ferry … run …` (an agent) under callgrind and anything else (the CLI) as is.
fn write_wrapper(path: &Path, agent: &Path, out_prefix: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // A dump every million basic blocks: what ran should an agent be killed, and a timeline that
    // tells shutdown (from the dump holding the stop signal's handler on) from the rest.
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = run ]; then\n    exec valgrind --tool=callgrind --demangle=no --dump-instr=no --dump-every-bb=1000000 --callgrind-out-file='{}.%p' '{}' \"$@\"\n  fi\ndone\nexec '{}' \"$@\"\n",
        out_prefix.display(),
        agent.display(),
        agent.display()
    );
    std::fs::write(path, script).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The signal handler tokio installs (signal-hook-registry's), which runs only when the agent is told
/// to stop; a prefix of its mangled name, whose hash varies.
const STOP_HANDLER: &str = "_ZN20signal_hook_registry7handler";

/// The callgrind files of one phase, per agent process, each in the order they were written:
/// `<phase>.<pid>.<n>` as the run went, then `<phase>.<pid>` at exit.
fn profiles(dir: &Path, phase: &str) -> Result<Vec<Vec<PathBuf>>> {
    let mut by_pid: std::collections::BTreeMap<u32, Vec<(u32, PathBuf)>> = Default::default();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix(&format!("{phase}.")) else {
            continue;
        };
        let (pid, n) = match rest.split_once('.') {
            Some((pid, n)) => (pid.parse().ok(), n.parse().ok()),
            None => (rest.parse().ok(), Some(u32::MAX)),
        };
        if let (Some(pid), Some(n)) = (pid, n) {
            by_pid.entry(pid).or_default().push((n, path));
        }
    }
    ensure!(
        !by_pid.is_empty(),
        "no callgrind output for the {phase} phase in {}",
        dir.display()
    );
    Ok(by_pid
        .into_values()
        .map(|mut files| {
            files.sort();
            files.into_iter().map(|(_, p)| p).collect()
        })
        .collect())
}

/// Function names in a callgrind file, in order of first mention. The format names a function once,
/// as `fn=(id) name` or `cfn=(id) name`, and by `(id)` alone after that; `'N` marks recursion depth.
fn functions_run(callgrind: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in callgrind.lines() {
        let Some(rest) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        else {
            continue;
        };
        let Some((_, name)) = rest.split_once(") ") else {
            continue;
        };
        let name = match name.rsplit_once('\'') {
            Some((base, depth)) if depth.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => name,
        };
        // Unnamed code (`0x…`) and valgrind's own frames (`(below main)`) are not symbols.
        if name.starts_with("0x") || name.starts_with('(') || name.is_empty() {
            continue;
        }
        if seen.insert(name.to_string()) {
            out.push(name.to_string());
        }
    }
    out
}

/// `ran`, and next to each of glibc's string functions every variant of it: glibc picks one per CPU
/// at start-up (`__memmove_avx_unaligned_erms`, `__memmove_evex_unaligned_erms`, …), and the CPU
/// valgrind emulates is not the node's.
fn with_ifunc_siblings(ran: &[String], defined: &HashSet<String>) -> Vec<String> {
    let mut sorted: Vec<&String> = defined.iter().collect();
    sorted.sort();
    let mut out = Vec::new();
    for name in ran {
        out.push(name.clone());
        if let Some(family) = ifunc_family(name) {
            out.extend(
                sorted
                    .iter()
                    .filter(|d| d.starts_with(&family) && *d != &name)
                    .map(|d| d.to_string()),
            );
        }
    }
    out
}

/// `__memmove_` for `__memmove_avx_unaligned_erms`: the prefix every variant of a glibc string
/// function shares.
fn ifunc_family(name: &str) -> Option<String> {
    let base = name.strip_prefix("__")?;
    let (func, variant) = base.split_once('_')?;
    let string_fn = ["mem", "str", "stp", "wcs", "wmem", "rawmem"]
        .iter()
        .any(|p| func.starts_with(p));
    let cpu_variant = ["sse2", "sse4", "ssse3", "avx", "evex", "erms"]
        .iter()
        .any(|v| variant.contains(v));
    (string_fn && cpu_variant).then(|| format!("__{func}_"))
}

/// The names of the functions `binary` defines.
fn text_symbols(binary: &Path) -> Result<HashSet<String>> {
    let data = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an object file", binary.display()))?;
    Ok(file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_names_are_read_once_with_recursion_marks_and_unnamed_code_dropped() {
        let text = "\
fl=(1) /bin/ferry
fn=(1) _ZN5ferry4main17h0123456789abcdefE
0 5
cfn=(2) _ZN5tokio7runtime5block17hfedcba9876543210E
calls=1 0
0 10
fn=(2)
0 3
cfn=(3) _ZN5tokio7runtime5block17hfedcba9876543210E'2
cfn=(4) 0x0000000000e35620
fn=(5) (below main)
fn=(6) __memmove_avx_unaligned_erms
cfn=(1)
";
        assert_eq!(
            functions_run(text),
            [
                "_ZN5ferry4main17h0123456789abcdefE",
                "_ZN5tokio7runtime5block17hfedcba9876543210E",
                "__memmove_avx_unaligned_erms",
            ]
        );
    }

    #[test]
    fn profiles_are_grouped_per_process_in_the_order_callgrind_wrote_them() {
        let dir = TempDir::new("ferry-link-order-test").expect("temp dir");
        for name in [
            "start.12.2",
            "start.12.10",
            "start.12",
            "start.7.1",
            "traffic.12.1",
            "start.notapid",
        ] {
            std::fs::write(dir.0.join(name), "").expect("write");
        }
        let names: Vec<Vec<String>> = profiles(&dir.0, "start")
            .expect("profiles")
            .into_iter()
            .map(|files| {
                files
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            [
                vec!["start.7.1"],
                vec!["start.12.2", "start.12.10", "start.12"]
            ]
        );
        assert!(profiles(&dir.0, "stop").is_err());
    }

    #[test]
    fn a_glibc_string_function_brings_its_cpu_variants_and_nothing_else_does() {
        let defined: HashSet<String> = [
            "__memmove_avx_unaligned_erms",
            "__memmove_evex_unaligned_erms",
            "__memmove_sse2_unaligned",
            "__memchr_evex",
            "_ZN5ferry4main17h0123456789abcdefE",
            "__libc_start_main",
        ]
        .map(String::from)
        .into();
        let listed = with_ifunc_siblings(
            &[
                "__memmove_avx_unaligned_erms".to_string(),
                "__libc_start_main".to_string(),
            ],
            &defined,
        );
        assert_eq!(
            listed,
            [
                "__memmove_avx_unaligned_erms",
                "__memmove_evex_unaligned_erms",
                "__memmove_sse2_unaligned",
                "__libc_start_main",
            ]
        );
    }

    #[test]
    fn a_binary_the_list_was_not_taken_from_is_called_stale() {
        // This test binary is not the agent: next to none of the agent's functions are in it.
        let root = crate::workspace_root().expect("workspace root");
        let me = std::env::current_exe().expect("test binary");
        let (present, listed) = coverage(&root, &me).expect("coverage");
        assert!(
            listed > 500 && present * 4 < listed,
            "{present} of {listed}"
        );
        let err = check(&root, &me).expect_err("a stale list fails the check");
        assert!(err.to_string().contains("cargo xtask link-order"), "{err}");
    }

    #[test]
    fn the_checked_in_list_is_a_list_of_mangled_names() {
        // Whatever the build, the file lld reads must hold symbol names only, one per line, and
        // comments: a stray path or a demangled name would silently order nothing.
        let root = crate::workspace_root().expect("workspace root");
        let list = std::fs::read_to_string(root.join(FILE)).expect("agent/link-order.txt");
        let names: Vec<&str> = list
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        assert!(names.len() > 500, "only {} names", names.len());
        for n in &names {
            assert!(
                !n.contains(char::is_whitespace) && !n.contains("::"),
                "not a mangled symbol name: {n:?}"
            );
        }
        let unique: HashSet<&&str> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "a name listed twice");
    }
}
