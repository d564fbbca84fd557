use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SkSkb, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use ferry_common::{
    DeliveryKey, MAP_LAYOUT_VERSION, OrigDst, PodEntry, Settings, SocketKey, SplicePeer, TupleKey,
    counters, maps, programs, splice_counters,
};

use super::{CaptureError, link, raw_addr, socket_addr, splice::Splice};
use crate::config::NodeConfig;

#[cfg(feature = "ebpf")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf"));
#[cfg(not(feature = "ebpf"))]
static OBJECT: &[u8] = &[];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup programs, their attach points and their pin names.
const CGROUP_PROGRAMS: [&str; 5] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCKOPS,
];

/// The node's capture state: loaded programs and handles on the pinned maps.
pub struct Capture {
    root: PathBuf,
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, PodEntry>>,
    orig_by_tuple: Mutex<HashMap<MapData, TupleKey, OrigDst>>,
    sockets: Mutex<SockHash<MapData, SocketKey>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u8>>,
    counters: PerCpuArray<MapData, u64>,
    splice_counters: PerCpuArray<MapData, u64>,
    /// The same-node fast path, when enabled and its program attached.
    splice: Option<std::sync::Arc<Splice>>,
    /// Why the fast path is off, for `ferry status` and the log.
    pub splice_off: Option<String>,
    /// Whether this process attached the cgroup programs or found them already attached.
    pub reopened: bool,
}

/// Sums of the per-CPU capture counters, by name.
pub type Counters = BTreeMap<&'static str, u64>;

fn statfs_type(path: &Path) -> Result<i64, CaptureError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| CaptureError::Io {
        what: format!("statfs {}", path.display()),
        source: e.into(),
    })?;
    Ok(st.filesystem_type().0 as i64)
}

fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}

fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

pub(super) fn sk_lookup_pin(root: &Path, netns_cookie: u64) -> PathBuf {
    links_dir(root).join(format!("sk_lookup-{netns_cookie}"))
}

/// Checks the prerequisites with one clear sentence each.
fn check_prerequisites(cfg: &NodeConfig) -> Result<(), CaptureError> {
    let bpffs_parent = cfg
        .bpffs_root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if statfs_type(bpffs_parent)? != BPF_FS_MAGIC {
        return Err(CaptureError::NoBpffs {
            path: bpffs_parent.to_owned(),
        });
    }
    if statfs_type(&cfg.cgroup_root).ok() != Some(CGROUP2_SUPER_MAGIC) {
        return Err(CaptureError::NotCgroup2 {
            path: cfg.cgroup_root.clone(),
            hint: "set cgroup_root in the node config to the host's cgroup v2 mount (or a directory below it)",
        });
    }
    Ok(())
}

impl Capture {
    /// Loads and attaches the capture programs for this node, or re-opens what an earlier agent left.
    pub fn open(cfg: &NodeConfig) -> Result<Self, CaptureError> {
        Self::open_object(cfg, OBJECT)
    }

    /// [`Capture::open`] with another eBPF object than the built-in one (the upgrade tests load a
    /// variant to prove a differing object takes over the pinned links and maps).
    pub fn open_object(cfg: &NodeConfig, object: &[u8]) -> Result<Self, CaptureError> {
        if object.is_empty() {
            return Err(CaptureError::NotBuilt);
        }
        check_prerequisites(cfg)?;
        let root = cfg.bpffs_root.clone();
        for dir in [maps_dir(&root), links_dir(&root)] {
            std::fs::create_dir_all(&dir)
                .map_err(CaptureError::io(format!("creating {}", dir.display())))?;
        }
        check_pinned_layouts(&maps_dir(&root))?;
        // The fast path's verdict compares each buffer's first sequence number with its socket's
        // `copied_seq`, both read out of kernel structures whose layout only the kernel's BTF tells.
        // Without it the fast path is unavailable.
        let layout = cfg.capture.fast_path.then(super::btf::SkbLayout::of_kernel);
        let (cb, sk, copied_seq) = match &layout {
            Some(Ok(l)) => (l.cb, l.sk, l.copied_seq),
            _ => (0, 0, 0),
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir(&root))
            .override_global("SKB_CB_OFFSET", &cb, true)
            .override_global("SKB_SK_OFFSET", &sk, true)
            .override_global("TCP_COPIED_SEQ_OFFSET", &copied_seq, true)
            .load(object)
            .map_err(CaptureError::bpf("loading the eBPF object"))?;

        // Programs are loaded while the object still owns every map: loading resolves the map
        // descriptors embedded in the instructions, so no map may be taken (and closed) before.
        for name in CGROUP_PROGRAMS {
            if name == programs::SOCKOPS {
                let prog: &mut SockOps = program(&mut ebpf, name)?;
                prog.load()
                    .map_err(CaptureError::bpf(format!("loading {name}")))?;
            } else {
                let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                prog.load()
                    .map_err(CaptureError::bpf(format!("loading {name}")))?;
            }
        }
        let sk_lookup: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        sk_lookup
            .load()
            .map_err(CaptureError::bpf("loading ferry_sk_lookup"))?;
        // The fast path is an optimisation: if its program does not load, connections are relayed in
        // userspace as before.
        let verdict_loaded = layout.map(|layout| {
            layout
                .map_err(|e| CaptureError::Bpf {
                    what: "checking the kernel for the fast path's guard (release, BTF layout)"
                        .into(),
                    message: e.to_string(),
                })
                .and_then(|_| program::<SkSkb>(&mut ebpf, programs::SPLICE_VERDICT))
                .and_then(|p| {
                    p.load()
                        .map_err(CaptureError::bpf("loading ferry_splice_verdict"))
                })
        });

        let mut meta: Array<_, u32> = take_map(&mut ebpf, maps::META)?;
        let found = meta
            .get(&0, 0)
            .map_err(CaptureError::bpf("reading FERRY_META"))?;
        if found == 0 {
            meta.set(0, MAP_LAYOUT_VERSION, 0)
                .map_err(CaptureError::bpf("writing FERRY_META"))?;
        } else if found != MAP_LAYOUT_VERSION {
            return Err(CaptureError::LayoutMismatch {
                path: maps_dir(&root),
                found,
                ours: MAP_LAYOUT_VERSION,
            });
        }
        let mut settings: Array<_, Settings> = take_map(&mut ebpf, maps::SETTINGS)?;
        settings
            .set(
                0,
                Settings {
                    outbound_port: cfg.ports.outbound,
                    hbone_port: cfg.ports.hbone,
                    _pad: 0,
                },
                0,
            )
            .map_err(CaptureError::bpf("writing FERRY_SETTINGS"))?;
        sync_exclusions(&mut ebpf, cfg)?;

        let cgroup = File::open(&cfg.cgroup_root).map_err(CaptureError::io(format!(
            "opening cgroup {}",
            cfg.cgroup_root.display()
        )))?;
        // With bpf links, cgroup attachments always coexist with other programs (the kernel treats them
        // as multi-attach); `Single` only means "no extra flags", which link_create requires.
        let mut reopened = true;
        for name in CGROUP_PROGRAMS {
            let pin = links_dir(&root).join(name);
            if PinnedLink::from_pin(&pin).is_ok() {
                replace_program(&ebpf, name, &pin)?;
                continue;
            }
            reopened = false;
            let what = format!("attaching {name} to {}", cfg.cgroup_root.display());
            let link: FdLink = if name == programs::SOCKOPS {
                let prog: &mut SockOps = program(&mut ebpf, name)?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(CaptureError::bpf(what.clone()))?;
                let link = prog
                    .take_link(id)
                    .map_err(CaptureError::bpf(what.clone()))?;
                link.try_into().map_err(CaptureError::bpf(what.clone()))?
            } else {
                let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(CaptureError::bpf(what.clone()))?;
                let link = prog
                    .take_link(id)
                    .map_err(CaptureError::bpf(what.clone()))?;
                link.try_into().map_err(CaptureError::bpf(what.clone()))?
            };
            link.pin(&pin)
                .map_err(CaptureError::bpf(format!("pinning {}", pin.display())))?;
        }

        // Every pod netns a predecessor attached keeps its link; it runs this agent's program now.
        if let Ok(entries) = std::fs::read_dir(links_dir(&root)) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("sk_lookup-")
                {
                    replace_program(&ebpf, programs::SK_LOOKUP, &entry.path())?;
                }
            }
        }

        let asked = verdict_loaded.is_some();
        let (splice, splice_off) = match verdict_loaded {
            None => (
                None,
                Some("disabled in the node config (capture.fast_path)".to_owned()),
            ),
            Some(Err(e)) => (None, Some(e.to_string())),
            Some(Ok(())) => match attach_splice(&mut ebpf, cfg.capture.fast_path_max_pairs) {
                Ok(s) => (Some(std::sync::Arc::new(s)), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        match (&splice_off, asked) {
            // Asked for and not available: the operator should know.
            (Some(why), true) => {
                tracing::warn!(reason = %why, "same-node fast path off: same-node connections are relayed in userspace")
            }
            // The default.
            (Some(why), false) => {
                tracing::info!(reason = %why, "same-node fast path off: same-node connections are relayed in userspace")
            }
            (None, _) => {}
        }

        Ok(Self {
            splice,
            splice_off,
            enrolled: Mutex::new(take_map(&mut ebpf, maps::ENROLLED)?),
            orig_by_tuple: Mutex::new(take_map(&mut ebpf, maps::ORIG_BY_TUPLE)?),
            sockets: Mutex::new(take_map(&mut ebpf, maps::SOCKETS)?),
            deliveries: Mutex::new(take_map(&mut ebpf, maps::DELIVERIES)?),
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            splice_counters: take_map(&mut ebpf, maps::SPLICE_COUNTERS)?,
            ebpf: Mutex::new(ebpf),
            root,
            reopened,
        })
    }

    /// The same-node fast path, when it is on.
    pub fn splice(&self) -> Option<&std::sync::Arc<Splice>> {
        self.splice.as_ref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The original destination of a captured connect, looked up by the agent's view of it: the netns
    /// of the listener that accepted it and the peer address. The entry is consumed.
    pub fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey {
            netns_cookie,
            local: raw_addr(peer),
            _pad: 0,
        };
        let mut map = self.orig_by_tuple.lock().ok()?;
        let orig = map.get(&key, 0).ok()?;
        // A failed removal only leaves an entry for the LRU to evict.
        let _ = map.remove(&key);
        socket_addr(&orig.dst)
    }

    /// Lets the agent's own connection from `src` to an app at `dst` (inside the app's netns) pass
    /// `sk_lookup` until the returned guard is dropped — once the connection is established.
    pub fn announce_delivery(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<DeliveryGuard<'_>, CaptureError> {
        let key = DeliveryKey {
            src: raw_addr(src),
            dst: raw_addr(dst),
        };
        let mut map = self
            .deliveries
            .lock()
            .map_err(|_| poisoned("FERRY_DELIVERIES"))?;
        map.insert(key, 1, 0).map_err(CaptureError::bpf(
            "announcing a delivery in FERRY_DELIVERIES",
        ))?;
        Ok(DeliveryGuard { capture: self, key })
    }

    /// Cgroup ids of enrolled pods and the netns cookies recorded for them.
    pub fn enrolled(&self) -> Vec<(u64, u64)> {
        let Ok(map) = self.enrolled.lock() else {
            return Vec::new();
        };
        map.iter()
            .filter_map(Result::ok)
            .map(|(id, e)| (id, e.netns_cookie))
            .collect()
    }

    pub(super) fn set_enrolled(
        &self,
        cgroup_id: u64,
        netns_cookie: u64,
    ) -> Result<(), CaptureError> {
        let mut map = self
            .enrolled
            .lock()
            .map_err(|_| poisoned("FERRY_ENROLLED"))?;
        map.insert(cgroup_id, PodEntry { netns_cookie }, 0)
            .map_err(CaptureError::bpf("enrolling in FERRY_ENROLLED"))
    }

    pub(super) fn clear_enrolled(&self, cgroup_id: u64) -> Result<(), CaptureError> {
        let mut map = self
            .enrolled
            .lock()
            .map_err(|_| poisoned("FERRY_ENROLLED"))?;
        match map.remove(&cgroup_id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(CaptureError::bpf("un-enrolling from FERRY_ENROLLED")(e)),
        }
    }

    pub(super) fn set_socket(&self, key: SocketKey, fd: &impl AsRawFd) -> Result<(), CaptureError> {
        let mut map = self.sockets.lock().map_err(|_| poisoned("FERRY_SOCKETS"))?;
        map.insert(key, fd.as_raw_fd(), 0)
            .map_err(CaptureError::bpf("registering a listener in FERRY_SOCKETS"))
    }

    pub(super) fn clear_socket(&self, key: &SocketKey) {
        if let Ok(mut map) = self.sockets.lock() {
            let _ = map.remove(key);
        }
    }

    /// Attaches `sk_lookup` to a pod's netns unless a pinned link for it exists already.
    pub(super) fn attach_sk_lookup(
        &self,
        netns: &File,
        netns_cookie: u64,
    ) -> Result<(), CaptureError> {
        let pin = sk_lookup_pin(&self.root, netns_cookie);
        if PinnedLink::from_pin(&pin).is_ok() {
            return Ok(());
        }
        let mut ebpf = self.ebpf.lock().map_err(|_| poisoned("the eBPF object"))?;
        let prog: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        let what = format!("attaching sk_lookup to netns {netns_cookie}");
        let id = prog
            .attach(netns)
            .map_err(CaptureError::bpf(what.clone()))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(CaptureError::bpf(what.clone()))?
            .into();
        link.pin(&pin)
            .map_err(CaptureError::bpf(format!("pinning {}", pin.display())))?;
        Ok(())
    }

    pub(super) fn detach_sk_lookup(&self, netns_cookie: u64) -> Result<(), CaptureError> {
        let pin = sk_lookup_pin(&self.root, netns_cookie);
        match PinnedLink::from_pin(&pin) {
            // Dropping the last reference detaches the program from the netns.
            Ok(link) => link
                .unpin()
                .map(drop)
                .map_err(CaptureError::io(format!("unpinning {}", pin.display()))),
            Err(_) if !pin.exists() => Ok(()),
            Err(e) => Err(CaptureError::bpf(format!("opening {}", pin.display()))(e)),
        }
    }

    /// Sums of the per-CPU counters the programs keep.
    pub fn counters(&self) -> Counters {
        let mut out = Counters::new();
        for (i, name) in counters::NAMES.iter().enumerate() {
            let sum = self
                .counters
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            out.insert(*name, sum);
        }
        for (i, name) in splice_counters::NAMES.iter().enumerate() {
            let sum = self
                .splice_counters
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            out.insert(*name, sum);
        }
        if let Some(splice) = &self.splice {
            let (checked, mismatched) = splice.checks();
            out.insert("splice_checked", checked);
            out.insert("splice_mismatched", mismatched);
            out.insert("splice_repeat_cut", splice.repeats());
            out.insert("splice_refused", splice.refused());
            out.insert("splice_at_cap", splice.at_cap());
        }
        out
    }
}

/// Points a pinned link left by a predecessor at this agent's freshly loaded program (which shares
/// the pinned maps): an upgraded object takes over atomically, and the hook is never empty. Done even
/// when the object is the same: the predecessor's program instance would otherwise outlive it.
fn replace_program(ebpf: &Ebpf, name: &str, pin: &Path) -> Result<(), CaptureError> {
    let what = || format!("replacing the program of {}", pin.display());
    let prog = ebpf
        .program(name)
        .ok_or_else(|| CaptureError::Bpf {
            what: format!("program {name}"),
            message: "missing from the eBPF object".into(),
        })?
        .fd()
        .map_err(CaptureError::bpf(what()))?;
    let link_fd = link::open_pinned(pin).map_err(CaptureError::io(what()))?;
    let before = link::link_ids(link_fd.as_fd()).map_err(CaptureError::io(what()))?;
    link::update(link_fd.as_fd(), prog.as_fd()).map_err(CaptureError::io(what()))?;
    let after = link::link_ids(link_fd.as_fd()).map_err(CaptureError::io(what()))?;
    tracing::info!(
        program = name,
        link_id = before.0,
        from_program_id = before.1,
        to_program_id = after.1,
        "program replaced by link update"
    );
    Ok(())
}

/// Removes a delivery announcement when the delivery connection is established (or failed).
pub struct DeliveryGuard<'a> {
    capture: &'a Capture,
    key: DeliveryKey,
}

impl Drop for DeliveryGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.capture.deliveries.lock() {
            // The map is an LRU: an entry left behind is evicted eventually.
            let _ = map.remove(&self.key);
        }
    }
}

/// Attaches the loaded verdict program to `FERRY_SPLICE`. The attachment replaces whatever an earlier
/// agent attached, and ends with this process (the sockets it joins die with it too).
fn attach_splice(ebpf: &mut Ebpf, max_pairs: u32) -> Result<Splice, CaptureError> {
    let sockets: SockHash<MapData, u64> = take_map(ebpf, maps::SPLICE)?;
    let peers: HashMap<MapData, u64, SplicePeer> = take_map(ebpf, maps::SPLICE_PEERS)?;
    let next: HashMap<MapData, u64, u32> = take_map(ebpf, maps::SPLICE_NEXT)?;
    let prog: &mut SkSkb = program(ebpf, programs::SPLICE_VERDICT)?;
    prog.attach(sockets.fd()).map_err(CaptureError::bpf(
        "attaching ferry_splice_verdict to FERRY_SPLICE",
    ))?;
    Ok(Splice::new(sockets, peers, next, max_pairs))
}

pub(super) fn poisoned(what: &str) -> CaptureError {
    CaptureError::Bpf {
        what: what.into(),
        message: "lock poisoned by a panic".into(),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| CaptureError::Bpf {
        what: format!("map {name}"),
        message: "missing from the eBPF object".into(),
    })?;
    T::try_from(map).map_err(CaptureError::bpf(format!("map {name}")))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| CaptureError::Bpf {
        what: format!("program {name}"),
        message: "missing from the eBPF object".into(),
    })?;
    prog.try_into()
        .map_err(CaptureError::bpf(format!("program {name}")))
}

/// Key and value sizes of every pinned map, as this agent's programs use them.
fn expected_layouts() -> [(&'static str, usize, usize); 16] {
    use std::mem::size_of;
    [
        (maps::META, 4, 4),
        (maps::SETTINGS, 4, size_of::<Settings>()),
        (maps::ENROLLED, 8, size_of::<PodEntry>()),
        (maps::ORIG_BY_COOKIE, 8, size_of::<OrigDst>()),
        (
            maps::ORIG_BY_TUPLE,
            size_of::<TupleKey>(),
            size_of::<OrigDst>(),
        ),
        (maps::EXCLUDE_PORTS, 2, 1),
        (maps::INBOUND_EXCLUDE_PORTS, 2, 1),
        (maps::EXCLUDE_V4, 8, 1),
        (maps::EXCLUDE_V6, 20, 1),
        (maps::SOCKETS, size_of::<SocketKey>(), 4),
        (maps::DELIVERIES, size_of::<DeliveryKey>(), 1),
        (maps::COUNTERS, 4, 8),
        (maps::SPLICE, 8, 4),
        (maps::SPLICE_PEERS, 8, size_of::<SplicePeer>()),
        (maps::SPLICE_COUNTERS, 4, 8),
        (maps::SPLICE_NEXT, 8, 4),
    ]
}

/// aya re-opens a pinned map by name whatever its layout, and a program would then read keys of the
/// wrong size: refuse pinned state whose layout differs from ours, naming the map.
fn check_pinned_layouts(dir: &Path) -> Result<(), CaptureError> {
    for (name, key, value) in expected_layouts() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(CaptureError::bpf(format!(
            "reading pinned map {}",
            path.display()
        )))?;
        if (info.key_size() as usize, info.value_size() as usize) != (key, value) {
            return Err(CaptureError::PinnedLayout {
                path,
                found: (info.key_size(), info.value_size()),
                ours: (key as u32, value as u32),
            });
        }
    }
    Ok(())
}

/// Makes the exclusion maps equal the config (the maps outlive agents whose config differed).
fn sync_exclusions(ebpf: &mut Ebpf, cfg: &NodeConfig) -> Result<(), CaptureError> {
    for (name, ports) in [
        (maps::EXCLUDE_PORTS, &cfg.capture.exclude_ports),
        (
            maps::INBOUND_EXCLUDE_PORTS,
            &cfg.capture.inbound_exclude_ports,
        ),
    ] {
        let mut map: HashMap<_, u16, u8> = take_map(ebpf, name)?;
        let stale: Vec<u16> = map.keys().filter_map(Result::ok).collect();
        for k in stale {
            let _ = map.remove(&k);
        }
        for p in ports {
            map.insert(p, 1, 0)
                .map_err(CaptureError::bpf(format!("writing {name}")))?;
        }
    }
    let mut v4: LpmTrie<_, [u8; 4], u8> = take_map(ebpf, maps::EXCLUDE_V4)?;
    let mut v6: LpmTrie<_, [u8; 16], u8> = take_map(ebpf, maps::EXCLUDE_V6)?;
    for k in v4.keys().filter_map(Result::ok).collect::<Vec<_>>() {
        let _ = v4.remove(&k);
    }
    for k in v6.keys().filter_map(Result::ok).collect::<Vec<_>>() {
        let _ = v6.remove(&k);
    }
    for net in &cfg.capture.exclude_cidrs {
        let prefix = u32::from(net.prefix_len());
        match net.network() {
            IpAddr::V4(ip) => v4.insert(&Key::new(prefix, ip.octets()), 1, 0),
            IpAddr::V6(ip) => v6.insert(&Key::new(prefix, ip.octets()), 1, 0),
        }
        .map_err(CaptureError::bpf(format!("excluding {net}")))?;
    }
    Ok(())
}

/// Removes everything capture attached for this node: links (which detaches the programs once no
/// agent holds them), pinned maps and the bpffs root.
pub fn uninstall(cfg: &NodeConfig) -> Result<Vec<PathBuf>, CaptureError> {
    let mut removed = Vec::new();
    let root = &cfg.bpffs_root;
    for dir in [links_dir(root), maps_dir(root)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            std::fs::remove_file(&path)
                .map_err(CaptureError::io(format!("removing {}", path.display())))?;
            removed.push(path);
        }
        std::fs::remove_dir(&dir)
            .map_err(CaptureError::io(format!("removing {}", dir.display())))?;
    }
    if root.exists() {
        std::fs::remove_dir(root)
            .map_err(CaptureError::io(format!("removing {}", root.display())))?;
    }
    Ok(removed)
}

/// The cgroup id the kernel reports for a cgroup v2 directory.
pub(super) fn cgroup_id(path: &Path) -> Result<u64, CaptureError> {
    if statfs_type(path).ok() != Some(CGROUP2_SUPER_MAGIC) {
        return Err(CaptureError::NotCgroup2 {
            path: path.to_owned(),
            hint: "a pod's cgroup must be a cgroup v2 directory below the node's cgroup_root",
        });
    }
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(CaptureError::io(format!(
            "reading cgroup {}",
            path.display()
        )))
}

#[cfg(all(test, feature = "ebpf"))]
mod tests {
    use super::OBJECT;

    /// Section names of an ELF object.
    fn section_names(elf: &[u8]) -> Vec<String> {
        use object::{Object, ObjectSection};
        let file = object::File::parse(elf).expect("the embedded eBPF object is an ELF file");
        file.sections()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect()
    }

    #[test]
    fn the_embedded_object_keeps_btf_and_drops_dwarf() {
        let names = section_names(OBJECT);
        for kept in [".BTF", ".BTF.ext", "maps"] {
            assert!(
                names.iter().any(|n| n == kept),
                "{kept} missing from the embedded eBPF object: {names:?}"
            );
        }
        let dwarf: Vec<&String> = names.iter().filter(|n| n.contains(".debug_")).collect();
        assert!(
            dwarf.is_empty(),
            "the build should strip the embedded eBPF object's DWARF (see agent/build.rs), found {dwarf:?}"
        );
    }
}
