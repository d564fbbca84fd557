//! `cargo xtask image`: the agent's container image, `FROM scratch` around a static binary, built with
//! buildah (no daemon, no base image pulled) into an OCI archive, then checked from the archive alone:
//! its layers hold the binary and that binary runs.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

/// The triple the static binary is built for: glibc's static libc works for the agent (no NSS lookups:
/// it never resolves names), so the musl toolchain is not needed.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The name the DaemonSet (deploy/daemonset.yaml) runs.
const IMAGE: &str = concat!("localhost/ferry:", env!("CARGO_PKG_VERSION"));
/// vfs works everywhere (no overlay mounts, which nested or unprivileged setups may not allow); its cost,
/// a full copy per layer, is nothing for a one-layer image.
const STORAGE: &str = "--storage-driver=vfs";

/// Builds and checks the image; returns the static agent binary it holds.
pub fn run(root: &Path) -> Result<PathBuf> {
    let started = Instant::now();
    ensure_buildah()?;
    let binary = build_static(root)?;
    let archive = crate::target_dir(root).join("ferry-image.tar");
    build_and_push(root, &binary, &archive)?;
    check_archive(&archive)?;
    eprintln!(
        "xtask: image {IMAGE} in {} ({:.0} s)",
        archive.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(binary)
}

fn ensure_buildah() -> Result<()> {
    let present = Command::new("buildah")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing buildah");
    let _ = Command::new("apt-get").arg("update").status();
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "buildah"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    ensure!(
        st.success(),
        "could not install buildah: install it (`apt-get install buildah`) and retry"
    );
    Ok(())
}

/// Builds the agent for [`TARGET`] with the C runtime linked in, and checks that it is static.
pub fn build_static(root: &Path) -> Result<PathBuf> {
    let mut cmd = crate::cargo(root);
    cmd.args([
        "build",
        "--release",
        "-p",
        "ferry",
        "-p",
        "ferry-cni",
        "--target",
        TARGET,
    ]);
    // Per target rather than RUSTFLAGS: with --target, RUSTFLAGS would also reach the nested cargo
    // that builds the eBPF object for bpfel-unknown-none, where crt-static means nothing.
    cmd.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    );
    crate::status(cmd)?;
    let binary = crate::target_dir(root)
        .join(TARGET)
        .join("release")
        .join("ferry");
    // ferry-cni runs on the host, whatever its libc: static like the agent.
    for bin in [binary.clone(), binary.with_file_name("ferry-cni")] {
        let elf = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
        ensure!(
            !has_interpreter(&elf)?,
            "{} is dynamically linked (it has a program interpreter): a FROM scratch image could not run it",
            bin.display()
        );
    }
    Ok(binary)
}

/// Whether an ELF file has a `PT_INTERP` program header (a dynamic loader).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let file = ElfFile64::<object::Endianness>::parse(elf).context("not a 64-bit ELF file")?;
    let endian = file.endian();
    Ok(file
        .elf_program_headers()
        .iter()
        .any(|h| h.p_type(endian) == object::elf::PT_INTERP))
}

/// Builds the image from deploy/Containerfile in a context holding only the binary, pushes it to the
/// OCI archive and removes it from buildah's storage again, whatever happened.
fn build_and_push(root: &Path, binary: &Path, archive: &Path) -> Result<()> {
    let context = TempDir::new("ferry-image-context")?;
    std::fs::copy(binary, context.0.join("ferry"))
        .with_context(|| format!("copying {}", binary.display()))?;
    // The chained CNI plugin, built beside the agent (same target, same static C runtime): the
    // DaemonSet's install-cni container copies it onto the host.
    let cni = binary.with_file_name("ferry-cni");
    std::fs::copy(&cni, context.0.join("ferry-cni"))
        .with_context(|| format!("copying {}", cni.display()))?;
    if archive.exists() {
        std::fs::remove_file(archive)
            .with_context(|| format!("removing the old {}", archive.display()))?;
    }
    let mut bud = Command::new("buildah");
    bud.args([
        STORAGE,
        "bud",
        "--isolation=chroot",
        "--layers=false",
        "--rm",
    ])
    .args([
        "--build-arg",
        concat!("VERSION=", env!("CARGO_PKG_VERSION")),
    ])
    .arg("--file")
    .arg(root.join("deploy/Containerfile"))
    .args(["--tag", IMAGE])
    .arg(&context.0);
    let result = crate::status(bud).and_then(|()| {
        let mut push = Command::new("buildah");
        push.args([STORAGE, "push", IMAGE])
            .arg(format!("oci-archive:{}:{IMAGE}", archive.display()));
        crate::status(push)
    });
    // The image only served to make the archive; a failed build leaves no working container (--rm).
    let removed = Command::new("buildah")
        .args([STORAGE, "rmi", IMAGE])
        .output();
    result?;
    match removed {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "removing {IMAGE} from buildah's storage failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => Err(e).context("running buildah rmi"),
    }
}

/// Opens the archive as a runtime would: index → manifest → layers, unpacked in order, then runs the
/// binary the image's entrypoint names.
fn check_archive(archive: &Path) -> Result<()> {
    let dir = TempDir::new("ferry-image-check")?;
    let layout = dir.0.join("layout");
    let rootfs = dir.0.join("rootfs");
    std::fs::create_dir_all(&layout)?;
    std::fs::create_dir_all(&rootfs)?;
    untar(archive, &layout, None)?;
    let index = read_json(&layout.join("index.json"))?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no manifest")?;
    let manifest = read_json(&blob(&layout, manifest_digest)?)?;
    let layers = manifest["layers"]
        .as_array()
        .context("the manifest has no layers")?;
    for layer in layers {
        let digest = layer["digest"].as_str().context("a layer without digest")?;
        let media = layer["mediaType"].as_str().unwrap_or_default();
        let compression = if media.ends_with("+gzip") {
            Some("--gzip")
        } else if media.ends_with("+zstd") {
            Some("--zstd")
        } else {
            None
        };
        untar(&blob(&layout, digest)?, &rootfs, compression)?;
    }
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("the manifest has no config")?;
    let config = read_json(&blob(&layout, config_digest)?)?;
    let entrypoint = config["config"]["Entrypoint"][0]
        .as_str()
        .context("the image has no entrypoint")?;
    let binary = rootfs.join(entrypoint.trim_start_matches('/'));
    ensure!(
        binary.is_file(),
        "the image's entrypoint {entrypoint} is not in its layers"
    );
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let printed = String::from_utf8_lossy(&out.stdout);
    let expected = concat!("ferry ", env!("CARGO_PKG_VERSION"));
    ensure!(
        out.status.success() && printed.trim() == expected,
        "the image's binary printed {:?} (expected {expected:?}): {}",
        printed.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // The CNI plugin the install-cni container copies onto the host.
    let cni = rootfs.join("usr/local/bin/ferry-cni");
    let out = Command::new(&cni)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", cni.display()))?;
    let cni_expected = concat!("ferry-cni ", env!("CARGO_PKG_VERSION"));
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == cni_expected,
        "the image's ferry-cni printed {:?} (expected {cni_expected:?})",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    eprintln!(
        "xtask: the archive holds {} layer(s); its {entrypoint} runs: {expected}; ferry-cni runs",
        layers.len()
    );
    Ok(())
}

/// The path of a blob of an OCI layout, from a `sha256:<hex>` digest.
fn blob(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (algo, hex) = digest
        .split_once(':')
        .with_context(|| format!("malformed digest {digest:?}"))?;
    // The digest comes from the archive: it must not walk out of the layout.
    ensure!(
        !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) && algo == "sha256",
        "unexpected digest {digest:?}"
    );
    Ok(layout.join("blobs").join(algo).join(hex))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

fn untar(file: &Path, into: &Path, compression: Option<&str>) -> Result<()> {
    let mut tar = Command::new("tar");
    tar.arg("-x")
        .args(compression)
        .arg("-f")
        .arg(file)
        .arg("-C")
        .arg(into);
    crate::status(tar)
}

/// A directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{label}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_has_an_interpreter_and_digests_stay_in_the_layout() {
        // The test binary itself is dynamically linked (the default for the gnu target).
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert!(has_interpreter(&me).expect("elf"));
        assert!(has_interpreter(b"not an elf").is_err());
        assert!(blob(Path::new("/l"), "sha256:../../etc").is_err());
        assert_eq!(
            blob(Path::new("/l"), "sha256:ab12").expect("ok"),
            Path::new("/l/blobs/sha256/ab12")
        );
    }
}
