use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
};

use ferry_common::{FAMILY_V4, FAMILY_V6, SOCK_KIND_HBONE, SOCK_KIND_INBOUND, SocketKey};

use super::{Capture, CaptureError, bpf::cgroup_id, raw_addr};
use crate::{
    config::{LocalPod, Ports},
    netns::{Netns, netns_cookie},
};

/// The agent's sockets inside one pod's netns, ready to hand to the async runtime.
#[derive(Debug)]
pub struct PodListeners {
    /// Where the pod's captured connects land (loopback).
    pub outbound: Vec<TcpListener>,
    /// Where plaintext inbound connections from outside the pod are steered.
    pub inbound: Vec<TcpListener>,
    /// HBONE (mutual TLS) from other agents.
    pub hbone: Vec<TcpListener>,
}

/// What enrolling needs to know about a pod.
pub struct PodAddrs<'a> {
    pub local: &'a LocalPod,
    pub ips: &'a [std::net::IpAddr],
}

impl std::ops::Deref for PodAddrs<'_> {
    type Target = LocalPod;
    fn deref(&self) -> &LocalPod {
        self.local
    }
}

/// A pod enrolled in capture.
#[derive(Clone, Debug)]
pub struct EnrolledPod {
    pub netns: Netns,
    pub netns_cookie: u64,
    pub cgroup_id: u64,
    keys: Vec<SocketKey>,
}

fn listen(ns: &Netns, addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = ns.tcp_socket(addr.is_ipv6())?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Connections of a previous agent may linger in TIME_WAIT on these ports.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

impl Capture {
    /// Opens the agent's listeners inside the pod's netns (or takes `inherited` ones, passed over by a
    /// predecessor agent), registers them for `sk_lookup`, attaches `sk_lookup` to the netns and
    /// finally marks the cgroup enrolled, so capture starts only once there is somewhere for captured
    /// connections to go. Registering an inherited listener again is a no-op for the kernel: the
    /// sockhash entry already holds that very socket.
    pub fn enroll(
        &self,
        pod: &PodAddrs<'_>,
        ports: &Ports,
        cgroup_root: &std::path::Path,
        inherited: Option<PodListeners>,
    ) -> Result<(EnrolledPod, PodListeners), CaptureError> {
        if !pod.cgroup.starts_with(cgroup_root) || pod.cgroup == cgroup_root {
            return Err(CaptureError::NotCgroup2 {
                path: pod.cgroup.clone(),
                hint: "a pod's cgroup must be below the node's cgroup_root, where capture is attached",
            });
        }
        let cgroup_id = cgroup_id(&pod.cgroup)?;
        let netns = Netns::open(&pod.netns)?;
        let what = |s: &str| format!("{s} in netns {}", pod.netns.display());

        let listeners = match inherited {
            Some(l) => {
                check_inherited(&netns, &l, ports).map_err(|message| CaptureError::Inherited {
                    netns: pod.netns.clone(),
                    message,
                })?;
                l
            }
            None => open_listeners(&netns, ports, &what)?,
        };
        let cookie = netns_cookie(&listeners.outbound[0])
            .map_err(CaptureError::io(what("reading the netns cookie")))?;

        if pod.ips.is_empty() {
            return Err(CaptureError::Bpf {
                what: format!("pod netns {}", pod.netns.display()),
                message: "has no IPs: inbound steering needs the pod's addresses".into(),
            });
        }
        let mut keys = Vec::new();
        for (kind, socks) in [
            (SOCK_KIND_INBOUND, &listeners.inbound),
            (SOCK_KIND_HBONE, &listeners.hbone),
        ] {
            for l in socks {
                let v6 = matches!(l.local_addr(), Ok(SocketAddr::V6(_)));
                for ip in pod.ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                    let raw = raw_addr(SocketAddr::new(*ip, 0));
                    let key = SocketKey {
                        addr: raw.addr,
                        kind,
                        family: u32::from(if v6 { FAMILY_V6 } else { FAMILY_V4 }),
                    };
                    self.set_socket(key, l)?;
                    keys.push(key);
                }
            }
        }
        let ns_file = std::fs::File::open(&pod.netns)
            .map_err(CaptureError::io(format!("opening {}", pod.netns.display())))?;
        self.attach_sk_lookup(&ns_file, cookie)?;
        self.set_enrolled(cgroup_id, cookie)?;
        Ok((
            EnrolledPod {
                netns,
                netns_cookie: cookie,
                cgroup_id,
                keys,
            },
            listeners,
        ))
    }

    /// Stops capture for the pod at once (new connects are no longer rewritten), then removes its
    /// inbound steering. The caller closes the pod's listeners.
    pub fn unenroll(&self, pod: &EnrolledPod) -> Result<(), CaptureError> {
        self.clear_enrolled(pod.cgroup_id)?;
        for key in &pod.keys {
            self.clear_socket(key);
        }
        self.detach_sk_lookup(pod.netns_cookie)
    }

    /// Removes capture state of pods the kernel still has but the agent no longer knows (left by an
    /// earlier agent whose workloads differed).
    pub fn unenroll_stale(&self, keep: &[u64]) -> Vec<u64> {
        let mut removed = Vec::new();
        for (cgroup_id, cookie) in self.enrolled() {
            if keep.contains(&cgroup_id) {
                continue;
            }
            if self.clear_enrolled(cgroup_id).is_ok() {
                let _ = self.detach_sk_lookup(cookie);
                removed.push(cgroup_id);
            }
        }
        removed
    }
}

/// The agent's own listeners in a pod netns: outbound and inbound on loopback, HBONE on every address;
/// IPv6 ones unless the pod has IPv6 disabled.
fn open_listeners(
    netns: &Netns,
    ports: &Ports,
    what: &dyn Fn(&str) -> String,
) -> Result<PodListeners, CaptureError> {
    let mut listeners = PodListeners {
        outbound: Vec::new(),
        inbound: Vec::new(),
        hbone: Vec::new(),
    };
    let v4 = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, ports.outbound)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, ports.inbound)),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports.hbone)),
    ];
    let v6 = [
        SocketAddr::from((Ipv6Addr::LOCALHOST, ports.outbound)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, ports.inbound)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, ports.hbone)),
    ];
    for (i, addr) in v4.into_iter().enumerate() {
        let l =
            listen(netns, addr).map_err(CaptureError::io(what(&format!("listening on {addr}"))))?;
        [
            &mut listeners.outbound,
            &mut listeners.inbound,
            &mut listeners.hbone,
        ][i]
            .push(l);
    }
    for (i, addr) in v6.into_iter().enumerate() {
        match listen(netns, addr) {
            Ok(l) => [
                &mut listeners.outbound,
                &mut listeners.inbound,
                &mut listeners.hbone,
            ][i]
                .push(l),
            // IPv6 disabled in this pod: it has no IPv6 traffic to capture.
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                break;
            }
            Err(e) => return Err(CaptureError::io(what(&format!("listening on {addr}")))(e)),
        }
    }
    Ok(listeners)
}

/// Listeners from a predecessor must live in this pod's netns and listen on this config's ports:
/// a changed config or a recreated pod gets fresh ones instead.
fn check_inherited(netns: &Netns, l: &PodListeners, ports: &Ports) -> Result<(), String> {
    let probe = netns
        .tcp_socket(false)
        .map_err(|e| format!("probing the netns: {e}"))?;
    let ours = netns_cookie(&probe).map_err(|e| format!("reading the netns cookie: {e}"))?;
    let Some(first) = l.outbound.first() else {
        return Err("no outbound listener".into());
    };
    let theirs = netns_cookie(first).map_err(|e| format!("reading the netns cookie: {e}"))?;
    if ours != theirs {
        return Err(format!(
            "listeners are in netns {theirs}, the pod's netns is {ours}"
        ));
    }
    for (socks, port, kind) in [
        (&l.outbound, ports.outbound, "outbound"),
        (&l.inbound, ports.inbound, "inbound"),
        (&l.hbone, ports.hbone, "hbone"),
    ] {
        if socks.is_empty() {
            return Err(format!("no {kind} listener"));
        }
        for s in socks {
            match s.local_addr() {
                Ok(a) if a.port() == port => {}
                Ok(a) => {
                    return Err(format!(
                        "{kind} listener on {a}, the config says port {port}"
                    ));
                }
                Err(e) => return Err(format!("{kind} listener: {e}")),
            }
        }
    }
    Ok(())
}
