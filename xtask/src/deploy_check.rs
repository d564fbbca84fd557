//! `cargo xtask deploy-check`: the Kubernetes manifests in deploy/ are valid for a current Kubernetes
//! (kubernetes-validate, strict, offline schemas) and pass checkov's Kubernetes scan; the
//! kustomization lists exactly the manifests there. Both tools live in a virtualenv in the tools
//! folder, so their pinned dependencies never meet the system's Python packages.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.31.0";
const TOOLS: [&str; 2] = ["kubernetes-validate", "checkov"];

pub fn run(root: &Path) -> Result<()> {
    let started = Instant::now();
    let bin = ensure_tools(root)?;
    let deploy = root.join("deploy");
    let manifests = manifests(&deploy)?;
    check_kustomization(&deploy, &manifests)?;

    // Strict: a field the schema does not know (a typo such as `mountPropogation`) is an error, not
    // silently dropped as the API server would. deploy/examples/policies/ is not validated here: the
    // tool has no schema for Istio's CRDs, and Ferry's own strict parser checks those files
    // (`ferry policy lint deploy/examples/policies`).
    let mut validate = Command::new(bin.join("kubernetes-validate"));
    validate
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .args(&manifests);
    crate::status(validate).context("kubernetes-validate found invalid manifests")?;

    // Skipped checks are annotations on the resources, each with its reason (deploy/daemonset.yaml).
    let mut checkov = Command::new(bin.join("checkov"));
    checkov
        .arg("--directory")
        .arg(&deploy)
        .args(["--framework", "kubernetes", "--quiet", "--compact"])
        // No network: no call home, no download of Bridgecrew's policies.
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CHECKOV_RUN_SCA_PACKAGE_SCAN_V2", "false");
    crate::status(checkov).context("checkov found failing checks")?;

    eprintln!(
        "xtask: {} manifests valid for Kubernetes {KUBERNETES}, checkov passed ({:.0} s)",
        manifests.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Installs the tools into `<tools>/deploy-venv` unless both are already there.
fn ensure_tools(root: &Path) -> Result<PathBuf> {
    let venv = crate::setup::tools_dir(root).join("deploy-venv");
    let bin = venv.join("bin");
    let present = TOOLS.iter().all(|t| {
        Command::new(bin.join(t))
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if present {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing {} into {}",
        TOOLS.join(" and "),
        venv.display()
    );
    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(&venv);
    crate::status(mk)
        .context("creating a Python virtualenv (on Debian: apt-get install python3-venv)")?;
    let mut pip = Command::new(bin.join("python"));
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(TOOLS);
    crate::status(pip).context("installing the manifest checkers from PyPI")?;
    Ok(bin)
}

/// The manifests: every `*.yaml` directly in deploy/ except the kustomization itself.
fn manifests(deploy: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(deploy).with_context(|| format!("reading {}", deploy.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_file() && name.ends_with(".yaml") && name != "kustomization.yaml" {
            found.push(path);
        }
    }
    found.sort();
    ensure!(!found.is_empty(), "no manifests in {}", deploy.display());
    Ok(found)
}

/// There is no kustomize here; at least make sure `kubectl apply -k` would install every manifest and
/// nothing that does not exist (a file added without listing it is the usual slip).
fn check_kustomization(deploy: &Path, manifests: &[PathBuf]) -> Result<()> {
    let path = deploy.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut in_resources = false;
    let mut listed = Vec::new();
    for line in text.lines() {
        if !line.starts_with([' ', '-', '#']) && !line.is_empty() {
            in_resources = line.trim_end() == "resources:";
            continue;
        }
        if let Some(item) = line.trim().strip_prefix("- ").filter(|_| in_resources) {
            listed.push(item.trim().to_owned());
        }
    }
    listed.sort();
    let mut present: Vec<String> = manifests
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .collect();
    present.sort();
    if listed != present {
        bail!(
            "{} lists {listed:?} but deploy/ holds {present:?}",
            path.display()
        );
    }
    Ok(())
}
