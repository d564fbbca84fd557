//! Idempotent setup: prerequisites checked with one clear sentence each, then the eBPF toolchain
//! (nightly's rust-src and a bpf-linker built against the nightly's own libLLVM) installed into the
//! tools folder (`.tools/`, or `$FERRY_TOOLS_DIR`). A second run only checks and takes well under 2 s.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

pub fn tools_dir(root: &Path) -> PathBuf {
    std::env::var_os("FERRY_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools"))
}

pub fn setup(root: &Path) -> Result<()> {
    check_prerequisites()?;
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(root, &sysroot)?;
    ensure_cargo_fuzz(root)?;
    ensure_python_h2();
    Ok(())
}

fn check_prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("Ferry needs root (eBPF, network namespaces, cgroups): run this command as root.");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): use a kernel built with CONFIG_DEBUG_INFO_BTF=y."
        );
    }
    let cgroup2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|p| fs_type(p) == Some(0x6367_7270));
    if !cgroup2 {
        bail!(
            "no cgroup v2 hierarchy is mounted (looked at /sys/fs/cgroup/unified and /sys/fs/cgroup): mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`."
        );
    }
    if fs_type("/sys/fs/bpf") != Some(0xcafe_4a11) {
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount")?;
        if !st.success() {
            bail!(
                "/sys/fs/bpf is not a bpf filesystem and mounting one failed: run `mount -t bpf bpf /sys/fs/bpf`."
            );
        }
    }
    for tool in ["ip", "nsenter"] {
        if which(tool).is_none() {
            apt_install(&["iproute2", "util-linux"])?;
            break;
        }
    }
    // The reference CNI plugins (bridge, host-local) that the ferry-cni end-to-end test chains
    // ferry-cni after, as a runtime would.
    if !Path::new("/usr/lib/cni/bridge").exists() || !Path::new("/usr/lib/cni/host-local").exists()
    {
        apt_install(&["containernetworking-plugins"])?;
    }
    Ok(())
}

fn fs_type(path: &str) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|p| p.join(tool))
        .find(|p| p.exists())
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("xtask: installing {}", pkgs.join(" "));
    let _ = Command::new("apt-get").arg("update").status();
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !st.success() {
        bail!(
            "could not install {}: install them and retry.",
            pkgs.join(" ")
        );
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        _ => {
            eprintln!("xtask: installing the nightly toolchain (for the eBPF programs)");
            let st = Command::new("rustup")
                .args([
                    "toolchain",
                    "install",
                    NIGHTLY,
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ])
                .status()
                .context("running rustup")?;
            if !st.success() {
                bail!(
                    "the nightly Rust toolchain is missing and rustup could not install it: run `rustup toolchain install nightly --component rust-src`."
                );
            }
            nightly_sysroot()
        }
    }
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    let st = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
        .status()
        .context("running rustup")?;
    if !st.success() {
        bail!(
            "could not add rust-src to nightly: run `rustup component add rust-src --toolchain nightly`."
        );
    }
    Ok(())
}

/// The nightly's libLLVM file name, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`, and its major version.
fn nightly_llvm(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    let entry = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "the nightly toolchain ships no libLLVM.so.* in {}",
                lib.display()
            )
        })?;
    let name = entry
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {name}"))?;
    Ok((entry, major))
}

fn ensure_bpf_linker(root: &Path, sysroot: &Path) -> Result<()> {
    let tools = tools_dir(root);
    let (llvm, major) = nightly_llvm(sysroot)?;
    let stamp = tools.join("bpf-linker.stamp");
    let want = format!(
        "bpf-linker {BPF_LINKER_VERSION} against {}\n",
        llvm.display()
    );
    let linker = tools.join("bin/bpf-linker");
    if linker.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (once, about a minute)"
    );
    // bpf-linker links libLLVM dynamically: give it a prefix whose lib/ has both the plain name (for
    // linking) and the exact SONAME (so the binary runs outside rustup's environment).
    let prefix = tools.join("llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let soname = llvm.file_name().context("libLLVM has no file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(soname)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let st = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !st.success() {
        bail!(
            "building bpf-linker failed (see above): it needs crates.io and the nightly toolchain's libLLVM."
        );
    }
    std::fs::write(&stamp, want)?;
    Ok(())
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The policy parser's fuzz target runs (briefly) in the test suite.
fn ensure_cargo_fuzz(root: &Path) -> Result<()> {
    let tools = tools_dir(root);
    if tools.join("bin/cargo-fuzz").exists() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)",
        tools.display()
    );
    let st = Command::new("cargo")
        .args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
            "--root",
        ])
        .arg(&tools)
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("installing cargo-fuzz failed (see above): it needs crates.io.");
    }
    Ok(())
}

/// The HBONE conformance tests talk to an independent peer written with Python's `h2` package.
fn ensure_python_h2() {
    let ok = Command::new("python3")
        .args(["-c", "import h2"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return;
    }
    eprintln!(
        "xtask: installing Python's h2 package (independent HBONE peer for conformance tests)"
    );
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "h2"])
        .status();
}
