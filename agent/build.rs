//! Builds the eBPF object (crate `ferry-ebpf`, nightly) and embeds it, unless the `ebpf` feature is off.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    // Relative relocations packed (DT_RELR; binutils >= 2.38, glibc >= 2.36): the dynamic loader or
    // static-pie start-up reads a few KiB of them instead of 800 KiB, pages an idle agent kept mapped.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    link_order()?;
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("agent crate has no parent directory"))?;
    let ebpf_dir = root.join("ebpf");
    println!("cargo:rerun-if-changed={}", root.join("common").display());
    // `cargo xtask setup` installs bpf-linker here; put it first so a plain `cargo build` finds it.
    println!("cargo:rerun-if-env-changed=FERRY_TOOLS_DIR");
    let tools = env::var_os("FERRY_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools"))
        .join("bin");
    if !tools.join("bpf-linker").exists() && which_bpf_linker().is_none() {
        anyhow::bail!(
            "bpf-linker is not installed: run `cargo xtask setup` once (it builds the eBPF toolchain into .tools/)"
        );
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools];
    paths.extend(env::split_paths(&path));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("ebpf path is not UTF-8"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ferry-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    strip_debug_info(&PathBuf::from(env::var("OUT_DIR")?).join("ferry-ebpf"));
    Ok(())
}

/// Drops the DWARF that bpf-linker needed to make BTF (kept: `.BTF`, `.BTF.ext`) from the object
/// the agent embeds: 230 KiB -> 43 KiB, all of it read at start-up and so kept mapped. With the
/// toolchain's `rust-objcopy`; without one the object stays whole, which costs only memory.
fn strip_debug_info(object: &std::path::Path) {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = std::process::Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let host = env::var("HOST").unwrap_or_default();
    let Some(sysroot) = sysroot else {
        println!("cargo:warning=no rustc sysroot: the embedded eBPF object keeps its debug info");
        return;
    };
    let objcopy = sysroot
        .join("lib/rustlib")
        .join(host)
        .join("bin/rust-objcopy");
    // rust-objcopy links the toolchain's own libLLVM, which lives in the sysroot's lib/.
    let stripped = std::process::Command::new(&objcopy)
        .env("LD_LIBRARY_PATH", sysroot.join("lib"))
        .arg("--strip-debug")
        .arg(object)
        .status();
    match stripped {
        Ok(st) if st.success() => {}
        other => println!(
            "cargo:warning={} --strip-debug failed ({other:?}): the embedded eBPF object keeps its debug info",
            objcopy.display()
        ),
    }
}

/// Places the functions an agent runs (`link-order.txt`, from `cargo xtask link-order`) together at
/// the front of `.text`. The kernel maps a binary's code in 64 KiB windows around each fault: scattered
/// over 11 MB, the code of start-up kept 5.9 MB of it mapped; together, 2 MB. Only where rustc links
/// with its own lld (its default for x86_64-unknown-linux-gnu); `FERRY_LINK_ORDER=0` leaves it out, for
/// another linker. Names the binary lacks (a stale list, another build's hashes) are skipped silently:
/// `cargo xtask test` checks the list against the image's build.
fn link_order() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=FERRY_LINK_ORDER");
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || env::var("FERRY_LINK_ORDER").as_deref() == Ok("0")
    {
        return Ok(());
    }
    let list = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("link-order.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    if !list.exists() {
        println!(
            "cargo:warning={} is missing: the agent's code is laid out unprofiled",
            list.display()
        );
        return Ok(());
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    Ok(())
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|p| p.join("bpf-linker"))
        .find(|p| p.exists())
}
