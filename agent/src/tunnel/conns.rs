//! The table of live connections: what `ferry conns` lists, and what a policy reload re-checks.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use super::{CopyStats, conn::Direction, kill::KillSwitch};

/// What the policy engine needs to re-decide a live inbound connection.
#[derive(Clone, Debug)]
pub struct PolicyInput {
    /// `spiffe://…` of the verified source, none for plaintext.
    pub source: Option<crate::identity::Identity>,
    pub source_ip: std::net::IpAddr,
    /// `namespace/name` of the destination pod of this node.
    pub destination: String,
    pub destination_addr: SocketAddr,
}

pub struct ConnEntry {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub route: &'static str,
    /// The other end's verified identity, when the tunnel checked one.
    pub peer: Option<String>,
    pub started: Instant,
    pub stats: Arc<CopyStats>,
    /// Set for connections this node authorizes (the destination side). Boxed: most of a
    /// client-side agent's connections have none, and the entry lives as long as its connection.
    pub policy: Option<Box<PolicyInput>>,
    /// Thrown to end the relay from outside.
    pub kill: Arc<KillSwitch>,
}

impl ConnEntry {
    /// Ends the connection: its relay stops and both sides are torn down.
    pub fn close(&self) {
        self.kill.kill();
    }
}

#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    /// Most connections live at once since memory was last given back.
    peak: AtomicUsize,
    /// When to give memory back once more after a shrink (see [`TRIM_FOLLOW_UP`]).
    follow_up: Mutex<Option<Instant>>,
    /// Connections opened so far as of the last tick, and as of the last trim: a tick that finds no
    /// connection open and none opened since the one before is a quiet one.
    opened_at_tick: AtomicU64,
    opened_at_trim: AtomicU64,
}

/// After the connections of a burst closed, the HBONE connections that carried them go a little later:
/// the pool releases spare idle ones after its `spare_idle_timeout` (5 s, checked every 1.25 s), and
/// the peer agent closes its end when they do. What they held is given back with a second trim.
const TRIM_FOLLOW_UP: std::time::Duration = std::time::Duration::from_secs(8);

/// Below this many connections, what closing them frees is not worth a trim.
const TRIM_MIN_PEAK: usize = 64;

/// Removes its connection from the table when dropped.
pub struct Registered {
    table: Arc<ConnTable>,
    pub entry: Arc<ConnEntry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut live) = self.table.live.lock() {
            live.remove(&self.entry.id);
        }
    }
}

pub struct NewConn<'a> {
    pub direction: Direction,
    pub pod: &'a str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub route: &'static str,
    pub peer: Option<String>,
    pub policy: Option<PolicyInput>,
}

impl ConnTable {
    pub fn register(self: &Arc<Self>, c: NewConn<'_>) -> Registered {
        let entry = Arc::new(ConnEntry {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            direction: c.direction,
            pod: c.pod.to_owned(),
            src: c.src,
            dst: c.dst,
            route: c.route,
            peer: c.peer,
            started: Instant::now(),
            stats: Arc::new(CopyStats::new()),
            policy: c.policy.map(Box::new),
            kill: Arc::new(KillSwitch::default()),
        });
        if let Ok(mut live) = self.live.lock() {
            live.insert(entry.id, entry.clone());
            self.peak.fetch_max(live.len(), Ordering::Relaxed);
        }
        Registered {
            table: self.clone(),
            entry,
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<ConnEntry>> {
        let mut v: Vec<_> = self
            .live
            .lock()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|e| e.id);
        v
    }

    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the heap memory of closed connections back to the kernel once at most half of the peak
    /// is still open, or once the agent falls quiet after carrying anything (no connection open and
    /// none opened since the last tick: a few connections can leave megabytes behind, a bulk
    /// stream's grown buffers). glibc's allocator keeps freed memory otherwise, so the agent's RSS
    /// would stay at its peak (see [`crate::heap`]). Called from a periodic tick; returns whether it
    /// gave memory back.
    pub fn release_memory_if_shrunk(&self) -> bool {
        let opened = self.next.load(Ordering::Relaxed);
        let quiet = self.opened_at_tick.swap(opened, Ordering::Relaxed) == opened;
        let live = match self.live.lock() {
            Ok(mut l) => {
                // The table itself keeps room for its peak; a quarter full, it gives the rest back.
                let len = l.len();
                if l.capacity() > 4 * len.max(64) {
                    l.shrink_to(2 * len);
                }
                len
            }
            Err(_) => return false,
        };
        let peak = self.peak.load(Ordering::Relaxed);
        let Ok(mut follow_up) = self.follow_up.lock() else {
            return false;
        };
        let fell_quiet =
            live == 0 && quiet && self.opened_at_trim.load(Ordering::Relaxed) != opened;
        if (peak >= TRIM_MIN_PEAK && live <= peak / 2) || fell_quiet {
            self.peak.store(live, Ordering::Relaxed);
            *follow_up = Some(Instant::now() + TRIM_FOLLOW_UP);
        } else if follow_up.is_some_and(|at| Instant::now() >= at) {
            *follow_up = None;
        } else {
            return false;
        }
        self.opened_at_trim.store(opened, Ordering::Relaxed);
        trim(live, peak);
        true
    }
}

fn trim(live: usize, peak: usize) {
    let released = crate::heap::release_free();
    tracing::debug!(live, peak, released, "gave freed heap back to the kernel");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> NewConn<'static> {
        NewConn {
            direction: Direction::Outbound,
            pod: "shop/client",
            src: "198.18.1.10:40000".parse().unwrap(),
            dst: "198.18.2.20:8080".parse().unwrap(),
            route: "hbone",
            peer: None,
            policy: None,
        }
    }

    #[test]
    fn memory_is_released_once_half_the_peak_closed_and_the_peak_follows() {
        let table = Arc::new(ConnTable::default());
        let mut open: Vec<Registered> = (0..100).map(|_| table.register(conn())).collect();
        assert_eq!(table.peak.load(Ordering::Relaxed), 100);
        open.truncate(60);
        table.release_memory_if_shrunk();
        assert_eq!(
            table.peak.load(Ordering::Relaxed),
            100,
            "60 of 100 open: no trim yet"
        );
        open.truncate(50);
        table.release_memory_if_shrunk();
        assert_eq!(
            table.peak.load(Ordering::Relaxed),
            50,
            "trimmed at half: the peak restarts"
        );
        assert!(
            table.follow_up.lock().unwrap().is_some(),
            "a second trim is due after a shrink"
        );
        *table.follow_up.lock().unwrap() = Some(Instant::now());
        open.clear();
        table.release_memory_if_shrunk();
        assert_eq!(
            table.peak.load(Ordering::Relaxed),
            50,
            "a peak of 50 is below what is worth a trim"
        );
        assert!(
            table.follow_up.lock().unwrap().is_none(),
            "the due second trim ran, once"
        );
        assert!(table.is_empty());
        assert!(
            !table.release_memory_if_shrunk(),
            "quiet, but nothing opened since the last trim"
        );
        let again: Vec<Registered> = (0..80).map(|_| table.register(conn())).collect();
        assert_eq!(table.peak.load(Ordering::Relaxed), 80);
        drop(again);
        table.release_memory_if_shrunk();
        assert_eq!(table.peak.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn memory_is_released_once_the_agent_falls_quiet_after_any_traffic() {
        let table = Arc::new(ConnTable::default());
        assert!(!table.release_memory_if_shrunk(), "nothing carried yet");
        let first = table.register(conn());
        assert!(!table.release_memory_if_shrunk(), "a connection opened");
        assert!(!table.release_memory_if_shrunk(), "one still open");
        drop(first);
        assert!(
            table.release_memory_if_shrunk(),
            "none open, none opened since the last tick"
        );
        assert!(
            !table.release_memory_if_shrunk(),
            "nothing carried since the trim"
        );
        // Connections that keep coming, one at a time: no trim while they do.
        for _ in 0..3 {
            drop(table.register(conn()));
            assert!(
                !table.release_memory_if_shrunk(),
                "opened since the last tick"
            );
        }
        assert!(table.release_memory_if_shrunk(), "quiet again");
        *table.follow_up.lock().unwrap() = Some(Instant::now());
        assert!(
            table.release_memory_if_shrunk(),
            "the second trim after falling quiet"
        );
        assert!(!table.release_memory_if_shrunk());
    }
}
