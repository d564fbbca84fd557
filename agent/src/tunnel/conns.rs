//! The table of live connections: what `ferry conns` lists, and what a policy reload re-checks.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
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
    pub started_at: SystemTime,
    pub stats: Arc<CopyStats>,
    /// Set for connections this node authorizes (the destination side).
    pub policy: Option<PolicyInput>,
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
}

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
            started_at: SystemTime::now(),
            stats: Arc::new(CopyStats::new()),
            policy: c.policy,
            kill: Arc::new(KillSwitch::default()),
        });
        if let Ok(mut live) = self.live.lock() {
            live.insert(entry.id, entry.clone());
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
}
