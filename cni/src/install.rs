//! `ferry-cni install`: what the DaemonSet's `install-cni` container runs, as istio-cni's installer
//! does: copies this binary into the host's CNI bin dir and appends a `ferry-cni` entry to the chain
//! of the node's primary network config (the first `*.conflist`/`*.conf` in the CNI config dir,
//! which is the one the runtime uses). With `--watch` it keeps checking, because the primary
//! plugin's own installer may rewrite its config.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

pub const PLUGIN_TYPE: &str = "ferry-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a CNI network config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
}

pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub watch: bool,
    /// Change nothing; fail when something is not in place (the container's probes).
    pub check: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self, InstallError> {
        let mut o = Options {
            bin_dir: PathBuf::from("/host/opt/cni/bin"),
            conf_dir: PathBuf::from("/host/etc/cni/net.d"),
            agent_socket: PathBuf::from(ferry_cni::DEFAULT_SOCKET),
            exclude_namespaces: vec!["kube-system".into(), "ferry-system".into()],
            watch: false,
            check: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| InstallError::Usage(format!("{name} needs a value")))
            };
            match a.as_str() {
                "--bin-dir" => o.bin_dir = value(a)?.into(),
                "--conf-dir" => o.conf_dir = value(a)?.into(),
                "--agent-socket" => o.agent_socket = value(a)?.into(),
                "--exclude-namespaces" => {
                    o.exclude_namespaces = value(a)?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "--watch" => o.watch = true,
                "--check" => o.check = true,
                other => {
                    return Err(InstallError::Usage(format!(
                        "unknown argument {other:?} (--bin-dir, --conf-dir, --agent-socket, --exclude-namespaces, --watch, --check)"
                    )));
                }
            }
        }
        Ok(o)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so the runtime never reads half a
/// file (and a running plugin binary is replaced, not overwritten).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.ferry-tmp"));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The network config the runtime uses: the first `.conflist`/`.conf`/`.json` by name.
fn primary_config(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// `conf` with a `ferry-cni` entry at the end of its chain; `None` when it already has one. A single
/// plugin `.conf` becomes a list.
pub fn chained(conf: &Value, entry: &Value) -> Result<Option<Value>, String> {
    let obj = conf.as_object().ok_or("not a JSON object")?;
    let mut list = if let Some(plugins) = obj.get("plugins") {
        if !plugins.is_array() {
            return Err("plugins is not a list".into());
        }
        conf.clone()
    } else {
        let mut single = conf.clone();
        let mut list = serde_json::Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = single.as_object_mut().and_then(|o| o.remove(key)) {
                list.insert(key.into(), v);
            }
        }
        list.insert("plugins".into(), json!([single]));
        Value::Object(list)
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .ok_or("plugins is not a list")?;
    if plugins.iter().any(|p| p["type"] == PLUGIN_TYPE) {
        return Ok(None);
    }
    plugins.push(entry.clone());
    Ok(Some(list))
}

/// One pass: the binary in place, the chain patched. Returns what it did, for the log.
pub fn install_once(o: &Options, me: &Path) -> Result<Vec<String>, InstallError> {
    let mut did = Vec::new();
    let target = o.bin_dir.join(PLUGIN_TYPE);
    let ours = std::fs::read(me).map_err(io(me))?;
    if std::fs::read(&target).ok().as_deref() != Some(&ours[..]) {
        if !o.check {
            write_atomic(&target, &ours, 0o755)?;
        }
        did.push(format!("installed {}", target.display()));
    }
    let Some(conf_path) = primary_config(&o.conf_dir)? else {
        // The primary plugin has not written its config yet; the next pass chains it.
        if o.check {
            did.push(format!("no network config in {} yet", o.conf_dir.display()));
        }
        return Ok(did);
    };
    let text = std::fs::read_to_string(&conf_path).map_err(io(&conf_path))?;
    let conf: Value = serde_json::from_str(&text).map_err(|e| InstallError::Config {
        path: conf_path.clone(),
        message: e.to_string(),
    })?;
    let entry = json!({
        "type": PLUGIN_TYPE,
        "agentSocket": o.agent_socket,
        "excludeNamespaces": o.exclude_namespaces,
    });
    let patched = chained(&conf, &entry).map_err(|message| InstallError::Config {
        path: conf_path.clone(),
        message,
    })?;
    if let Some(list) = patched {
        if o.check {
            did.push(format!("chained ferry-cni into {}", conf_path.display()));
            return Ok(did);
        }
        // A .conf turned into a list must be named .conflist for the runtime to read the chain;
        // the new name sorts the same way, and the old file goes.
        let out = conf_path.with_extension("conflist");
        let mut bytes = serde_json::to_vec_pretty(&list).map_err(|e| InstallError::Config {
            path: out.clone(),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(&out, &bytes, 0o644)?;
        if out != conf_path {
            std::fs::remove_file(&conf_path).map_err(io(&conf_path))?;
        }
        did.push(format!("chained ferry-cni into {}", out.display()));
    }
    Ok(did)
}

/// `conf` without its `ferry-cni` entry; `None` when it has none.
pub fn unchained(conf: &Value) -> Option<Value> {
    let plugins = conf.get("plugins")?.as_array()?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN_TYPE) {
        return None;
    }
    let mut out = conf.clone();
    if let Some(list) = out["plugins"].as_array_mut() {
        list.retain(|p| p["type"] != PLUGIN_TYPE);
    }
    Some(out)
}

/// Takes `ferry-cni` out of the primary config's chain (the binary stays: a runtime may be running
/// it). Without the agent, a chained ferry-cni would fail every meshed pod's network setup.
pub fn uninstall_once(o: &Options) -> Result<Vec<String>, InstallError> {
    let Some(conf_path) = primary_config(&o.conf_dir)? else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&conf_path).map_err(io(&conf_path))?;
    let conf: Value = serde_json::from_str(&text).map_err(|e| InstallError::Config {
        path: conf_path.clone(),
        message: e.to_string(),
    })?;
    let Some(list) = unchained(&conf) else {
        return Ok(Vec::new());
    };
    let mut bytes = serde_json::to_vec_pretty(&list).map_err(|e| InstallError::Config {
        path: conf_path.clone(),
        message: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(&conf_path, &bytes, 0o644)?;
    Ok(vec![format!(
        "removed ferry-cni from {}",
        conf_path.display()
    )])
}

/// Each running installer keeps a heartbeat file in the config dir (a dotfile, which runtimes
/// ignore), so one that stops can tell whether another (a rolling update's new pod) takes over.
const HEARTBEAT_PREFIX: &str = ".ferry-cni-installer.";
const HEARTBEAT_FRESH: Duration = Duration::from_secs(15);

fn heartbeat_path(o: &Options) -> PathBuf {
    let me = std::env::var("HOSTNAME").unwrap_or_else(|_| std::process::id().to_string());
    o.conf_dir.join(format!("{HEARTBEAT_PREFIX}{me}"))
}

/// Whether another installer beat within [`HEARTBEAT_FRESH`].
fn another_installer(o: &Options, mine: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir(&o.conf_dir) else {
        return false;
    };
    dir.flatten().any(|e| {
        let fresh = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < HEARTBEAT_FRESH);
        e.file_name()
            .to_string_lossy()
            .starts_with(HEARTBEAT_PREFIX)
            && e.path() != mine
            && fresh
    })
}

/// SIGTERM, delivered to a thread that waits for it; the main loop polls the flag.
fn watch_sigterm() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    // SAFETY: plain libc signal-mask calls on a zeroed sigset_t before any other thread exists;
    // the mask is inherited by the waiting thread, which takes the signal with sigwait.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let f = flag.clone();
        std::thread::spawn(move || {
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) == 0 {
                f.store(true, Ordering::Release);
            }
        });
    }
    flag
}

pub fn run(args: &[String]) -> Result<(), InstallError> {
    let o = Options::parse(args)?;
    let me = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    if o.check {
        let missing = install_once(&o, &me)?;
        if missing.is_empty() {
            return Ok(());
        }
        return Err(InstallError::Usage(format!(
            "not in place: {}",
            missing.join("; ")
        )));
    }
    if !o.watch {
        for d in install_once(&o, &me)? {
            eprintln!("ferry-cni install: {d}");
        }
        return Ok(());
    }
    let stop = watch_sigterm();
    let beat = heartbeat_path(&o);
    loop {
        match install_once(&o, &me) {
            Ok(did) => {
                for d in did {
                    eprintln!("ferry-cni install: {d}");
                }
            }
            Err(e) => eprintln!("ferry-cni install: {e}; retrying"),
        }
        let _ = std::fs::write(&beat, b"");
        for _ in 0..50 {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                let _ = std::fs::remove_file(&beat);
                // Uninstalled (or the node drained): take ferry-cni out of the chain, or pods could
                // not start without an agent. During a rolling update the new pod's installer keeps
                // it.
                if another_installer(&o, &beat) {
                    eprintln!("ferry-cni install: stopping; another installer keeps the chain");
                } else {
                    for d in uninstall_once(&o)? {
                        eprintln!("ferry-cni install: {d}");
                    }
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `ferry-cni uninstall`: the chain entry goes, by hand.
pub fn run_uninstall(args: &[String]) -> Result<(), InstallError> {
    let o = Options::parse(args)?;
    for d in uninstall_once(&o)? {
        eprintln!("ferry-cni uninstall: {d}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        json!({"type": PLUGIN_TYPE, "agentSocket": "/run/ferry/cni.sock"})
    }

    #[test]
    fn a_conflist_gets_ferry_at_the_end_of_its_chain_once() {
        let conf = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
            {"type": "bridge", "bridge": "cni0"}, {"type": "portmap", "capabilities": {"portMappings": true}}
        ]});
        let patched = chained(&conf, &entry()).unwrap().unwrap();
        let types: Vec<_> = patched["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "ferry-cni"]);
        assert_eq!(patched["name"], "k8s");
        assert_eq!(chained(&patched, &entry()).unwrap(), None, "idempotent");
        assert_eq!(
            unchained(&patched),
            Some(conf.clone()),
            "uninstall restores it"
        );
        assert_eq!(unchained(&conf), None);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf =
            json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"});
        let patched = chained(&conf, &entry()).unwrap().unwrap();
        assert_eq!(patched["cniVersion"], "0.4.0");
        assert_eq!(patched["plugins"][0]["type"], "bridge");
        assert!(patched["plugins"][0].get("cniVersion").is_none());
        assert_eq!(patched["plugins"][1]["type"], "ferry-cni");
        assert!(chained(&json!([1]), &entry()).is_err());
    }

    #[test]
    fn install_copies_the_binary_and_patches_the_first_config() {
        let dir = std::env::temp_dir().join(format!("ferry-cni-install-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let me = dir.join("plugin");
        std::fs::write(&me, b"\x7fELF plugin").unwrap();
        std::fs::write(
            conf.join("10-flannel.conflist"),
            r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"}]}"#,
        )
        .unwrap();
        std::fs::write(conf.join("99-other.conf"), r#"{"type":"x"}"#).unwrap();
        let o = Options::parse(&[
            "--bin-dir".into(),
            bin.to_string_lossy().into_owned(),
            "--conf-dir".into(),
            conf.to_string_lossy().into_owned(),
        ])
        .unwrap();
        let did = install_once(&o, &me).unwrap();
        assert_eq!(did.len(), 2, "{did:?}");
        assert_eq!(
            std::fs::read(bin.join("ferry-cni")).unwrap(),
            b"\x7fELF plugin"
        );
        let list: Value = serde_json::from_str(
            &std::fs::read_to_string(conf.join("10-flannel.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(list["plugins"][1]["type"], "ferry-cni");
        assert_eq!(
            std::fs::read_to_string(conf.join("99-other.conf")).unwrap(),
            r#"{"type":"x"}"#,
            "only the primary config is touched"
        );
        assert!(
            install_once(&o, &me).unwrap().is_empty(),
            "a second pass changes nothing"
        );
        // --check sees a config the network plugin rewrote, and changes nothing itself.
        std::fs::write(
            conf.join("10-flannel.conflist"),
            r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"}]}"#,
        )
        .unwrap();
        let check = Options { check: true, ..o };
        assert_eq!(install_once(&check, &me).unwrap().len(), 1);
        assert_eq!(
            install_once(&check, &me).unwrap().len(),
            1,
            "still not patched"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
