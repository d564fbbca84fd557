//! Builds the eBPF object (crate `ferry-ebpf`, nightly) and embeds it, unless the `ebpf` feature is off.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
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
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|p| p.join("bpf-linker"))
        .find(|p| p.exists())
}
