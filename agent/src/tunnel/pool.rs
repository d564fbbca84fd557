//! Reuse of outbound HBONE connections: one key (for Ferry: source pod, destination IP, expected
//! destination identity) maps to connections carrying up to a bounded number of streams each.
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::hbone_client::StreamSlot;
use super::{HboneClient, HboneStream, TunnelError};

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per connection before another connection is opened for the same key (ztunnel: 100).
    pub max_streams_per_connection: usize,
    /// A connection without streams for this long is released.
    pub idle_timeout: Duration,
    /// Beyond the first idle connection of a key, further idle ones (opened for a burst of streams)
    /// are released after this long: one stays ready for the key's next stream, the rest would only
    /// hold their buffers and HTTP/2 stream tables.
    pub spare_idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(5 * 60),
            spare_idle_timeout: Duration::from_secs(5),
        }
    }
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub keys: usize,
    /// All pooled connections, including draining ones.
    pub connections: usize,
    /// Connections that take no new streams (older generation, or the peer said GOAWAY) but still
    /// carry streams.
    pub draining: usize,
    /// Streams open (or being opened) over pooled connections.
    pub streams: usize,
}

/// A pool of HBONE client connections. Cheap to clone; clones share the pool.
pub struct Pool<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K> {
    config: PoolConfig,
    keys: Mutex<HashMap<K, Entry>>,
}

struct Entry {
    conns: Vec<Pooled>,
    /// Generations of the connects in flight for this key.
    connecting: Vec<u64>,
    /// Failed connects so far: a waiter seeing this change connects on its own instead of queueing
    /// behind another attempt to a peer that is failing.
    failures: u64,
    /// Highest generation requested: connections below it only drain.
    generation: u64,
    /// Woken when a connect for this key finished (either way).
    notify: Arc<Notify>,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            conns: Vec::new(),
            connecting: Vec::new(),
            failures: 0,
            generation: 0,
            notify: Arc::new(Notify::new()),
        }
    }
}

struct Pooled {
    client: HboneClient,
    generation: u64,
}

/// A pooled connection with one stream slot reserved for the caller, so that concurrent callers
/// never push a connection past its stream bound. Dropping it unused gives the slot back.
pub struct PooledClient {
    client: HboneClient,
    slot: StreamSlot,
    generation: u64,
}

impl PooledClient {
    /// Opens the stream in the reserved slot; see [`HboneClient::connect`].
    pub async fn connect(
        self,
        target: SocketAddr,
        forwarded_for: SocketAddr,
    ) -> Result<HboneStream, TunnelError> {
        self.connect_with_early_data(target, forwarded_for, Bytes::new())
            .await
    }

    /// Opens the stream with the connection's first bytes right behind the request; see
    /// `HboneClient::connect_in_slot`.
    pub async fn connect_with_early_data(
        self,
        target: SocketAddr,
        forwarded_for: SocketAddr,
        early: Bytes,
    ) -> Result<HboneStream, TunnelError> {
        self.client
            .connect_in_slot(target, forwarded_for, early, self.slot)
            .await
    }

    pub fn client(&self) -> &HboneClient {
        &self.client
    }

    /// Generation of the connection (the one requested when it was opened).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Deref for PooledClient {
    type Target = HboneClient;

    fn deref(&self) -> &HboneClient {
        &self.client
    }
}

impl Debug for PooledClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledClient")
            .field("client", &self.client)
            .field("generation", &self.generation)
            .finish()
    }
}

enum Step<F> {
    Ready(PooledClient),
    Wait(tokio::sync::futures::OwnedNotified, u64),
    Connect(F),
}

impl<K> Pool<K>
where
    K: Hash + Eq + Clone + Send + Sync + Debug + 'static,
{
    /// Creates a pool. Inside a tokio runtime this also starts a task releasing idle connections (it
    /// ends with the pool); elsewhere, idle connections are released on the next use of their key or
    /// by [`Pool::reap`].
    pub fn new(config: PoolConfig) -> Self {
        let inner = Arc::new(Inner {
            config,
            keys: Mutex::new(HashMap::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shortest = inner
                .config
                .idle_timeout
                .min(inner.config.spare_idle_timeout);
            let period = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
            runtime.spawn(reaper(Arc::downgrade(&inner), period));
        }
        Pool { inner }
    }

    /// A connection for `key` of at least `generation` with a free stream slot, opening one with
    /// `connect` when none has. Concurrent callers for a key wait for a connect in flight rather than
    /// opening their own, unless that connect fails.
    pub async fn get_or_connect<F, Fut>(
        &self,
        key: K,
        generation: u64,
        connect: F,
    ) -> Result<PooledClient, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneClient, TunnelError>>,
    {
        let mut connect = Some(connect);
        let mut seen_failures = None;
        let connect = loop {
            let step = {
                let mut keys = self.inner.lock();
                let entry = keys.entry(key.clone()).or_default();
                entry.generation = entry.generation.max(generation);
                self.inner.prune(entry, Instant::now());
                if let Some(client) = self.inner.pick(entry, generation) {
                    Step::Ready(client)
                } else if seen_failures.is_none_or(|f| f == entry.failures)
                    && entry.connecting.iter().any(|&g| g >= generation)
                {
                    Step::Wait(entry.notify.clone().notified_owned(), entry.failures)
                } else {
                    match connect.take() {
                        Some(f) => {
                            entry.connecting.push(generation);
                            Step::Connect(f)
                        }
                        // Only reachable if a connect of ours finished without a usable result,
                        // which returns instead; kept as an error rather than a panic.
                        None => return Err(TunnelError::Closed),
                    }
                }
            };
            match step {
                Step::Ready(client) => return Ok(client),
                Step::Wait(notified, failures) => {
                    seen_failures = Some(failures);
                    notified.await;
                }
                Step::Connect(f) => break f,
            }
        };
        let mut in_flight = InFlight {
            inner: &self.inner,
            key: &key,
            generation,
            failed: true,
            done: false,
        };
        let result = connect().await;
        let mut keys = self.inner.lock();
        let entry = keys.entry(key.clone()).or_default();
        match result {
            Ok(client) => {
                in_flight.failed = false;
                let slot = client.reserve_slot();
                entry.conns.push(Pooled {
                    client: client.clone(),
                    generation,
                });
                tracing::debug!(
                    ?key,
                    generation,
                    id = client.id(),
                    "HBONE pool: new connection"
                );
                in_flight.finish(entry);
                Ok(PooledClient {
                    client,
                    slot,
                    generation,
                })
            }
            Err(e) => {
                in_flight.finish(entry);
                Err(e)
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let keys = self.inner.lock();
        let mut stats = PoolStats {
            keys: keys.len(),
            ..PoolStats::default()
        };
        for entry in keys.values() {
            for conn in &entry.conns {
                stats.connections += 1;
                stats.streams += conn.client.active_streams();
                if !self.inner.eligible(entry, conn) {
                    stats.draining += 1;
                }
            }
        }
        stats
    }

    /// Drops dead, drained and idle connections now (the background task does this periodically).
    pub fn reap(&self) {
        self.inner.reap(Instant::now());
    }
}

impl<K: Hash + Eq + Clone + Debug> Inner<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        // The map is consistent after every statement under the lock, so a panic elsewhere while it
        // was held leaves nothing half-done.
        match self.keys.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether a connection may take new streams of this key.
    fn eligible(&self, entry: &Entry, conn: &Pooled) -> bool {
        conn.generation >= entry.generation && conn.client.is_ready()
    }

    fn prune(&self, entry: &mut Entry, now: Instant) {
        let idle_timeout = self.config.idle_timeout;
        let spare_idle_timeout = self.config.spare_idle_timeout.min(idle_timeout);
        let generation = entry.generation;
        let mut kept_idle = false;
        entry.conns.retain(|conn| {
            let client = &conn.client;
            if client.is_closed() {
                return false;
            }
            match client.idle_since() {
                // Dropping our handle lets h2 close the connection once its streams are gone.
                Some(_) if conn.generation < generation || !client.is_ready() => false,
                Some(since) => {
                    let limit = if kept_idle {
                        spare_idle_timeout
                    } else {
                        idle_timeout
                    };
                    let keep = now.saturating_duration_since(since) < limit;
                    kept_idle |= keep;
                    keep
                }
                None => true,
            }
        });
    }

    fn pick(&self, entry: &Entry, generation: u64) -> Option<PooledClient> {
        let max = self.config.max_streams_per_connection;
        entry
            .conns
            .iter()
            .filter(|c| c.generation >= generation && self.eligible(entry, c))
            .find(|c| c.client.active_streams() < max.min(c.client.peer_max_streams()))
            .map(|c| PooledClient {
                slot: c.client.reserve_slot(),
                client: c.client.clone(),
                generation: c.generation,
            })
    }

    fn reap(&self, now: Instant) {
        let mut keys = self.lock();
        keys.retain(|_, entry| {
            self.prune(entry, now);
            !entry.conns.is_empty() || !entry.connecting.is_empty()
        });
    }
}

/// Marks a connect in flight; also when the caller's future is dropped mid-connect, waiters are woken
/// and the mark removed.
struct InFlight<'a, K: Hash + Eq + Clone + Debug> {
    inner: &'a Inner<K>,
    key: &'a K,
    generation: u64,
    failed: bool,
    done: bool,
}

impl<K: Hash + Eq + Clone + Debug> InFlight<'_, K> {
    fn finish(mut self, entry: &mut Entry) {
        self.unmark(entry);
        self.done = true;
    }

    fn unmark(&self, entry: &mut Entry) {
        if let Some(i) = entry.connecting.iter().position(|&g| g == self.generation) {
            entry.connecting.swap_remove(i);
        }
        if self.failed {
            entry.failures += 1;
        }
        entry.notify.notify_waiters();
    }
}

impl<K: Hash + Eq + Clone + Debug> Drop for InFlight<'_, K> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut keys = self.inner.lock();
        if let Some(entry) = keys.get_mut(self.key) {
            self.unmark(entry);
        }
    }
}

async fn reaper<K: Hash + Eq + Clone + Debug>(inner: Weak<Inner<K>>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.reap(Instant::now());
    }
}
