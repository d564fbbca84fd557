//! Arbitrary text as the node config file: parsing returns a validated config or an error naming the
//! file, never panics, and a config it accepts holds the invariants the agent relies on.
//! Seeds: `agent/fuzz/seeds/node_config/`.
#![no_main]

use std::path::Path;

use ferry::config::{NodeConfig, WorkloadSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The file is read as UTF-8 text, so invalid UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/ferry/node.yaml");
    match NodeConfig::parse(path, text) {
        Ok(c) => {
            let p = c.ports;
            assert!(p.outbound != 0 && p.inbound != 0 && p.hbone != 0);
            assert!(p.outbound != p.inbound && p.inbound != p.hbone && p.outbound != p.hbone);
            assert!(c.bpffs_root.is_absolute() && c.cgroup_root.is_absolute());
            match &c.workloads {
                WorkloadSource::File(path) => {
                    assert!(path.is_absolute(), "relative paths resolve against /etc/ferry")
                }
                WorkloadSource::Kubernetes(k) => {
                    assert!(k.cni_socket.is_absolute() && k.kubepods_cgroup.is_absolute())
                }
            }
            assert_eq!(c.trust_domain.is_some(), c.certificates.is_some());
            let h = c.hbone;
            assert!(h.max_pending_handshakes_per_peer <= h.max_pending_handshakes);
            assert!(h.max_pending_handshakes_per_peer > 0 && h.max_streams_per_connection > 0);
            assert!(h.stream_window <= h.connection_window);
            assert!(!c.drain_deadline.is_zero() && !h.handshake_timeout.is_zero());
        }
        Err(e) => {
            assert!(e.to_string().contains("/etc/ferry/node.yaml"), "{e}");
        }
    }
});
