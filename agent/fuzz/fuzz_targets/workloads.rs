//! Arbitrary text as the workloads file: parsing returns a set or an error naming the file, never
//! panics, and a set it accepts has unique addresses and names, and capture paths for this node's
//! pods. Seeds: `agent/fuzz/seeds/workloads/`.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use ferry::config::WorkloadSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/ferry/workloads.yaml");
    match WorkloadSet::parse(path, text, "node1") {
        Ok(set) => {
            let mut keys = HashSet::new();
            let mut ips = HashSet::new();
            for w in set.iter() {
                assert!(keys.insert(w.key()), "duplicate {}", w.key());
                for ip in &w.ips {
                    assert!(ips.insert(*ip), "duplicate {ip}");
                    assert_eq!(set.by_ip(*ip).map(|x| x.key()), Some(w.key()));
                }
                assert_eq!(w.local.is_some(), w.node == "node1");
            }
            assert_eq!(set.local().count(), set.iter().filter(|w| w.node == "node1").count());
        }
        Err(e) => {
            assert!(e.to_string().contains("/etc/ferry/workloads.yaml"), "{e}");
        }
    }
});
