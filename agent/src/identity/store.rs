//! Per-identity cache of workload certificates with renewal at half-life.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use super::{
    bundle::TrustBundle,
    mint::{MintError, Minter, WorkloadCert},
    spiffe::Identity,
};

/// Source of "now" for certificate decisions, so tests can drive renewal without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(now: SystemTime) -> Self {
        Self(Mutex::new(now))
    }

    pub fn set(&self, now: SystemTime) {
        *lock(&self.0) = now;
    }

    pub fn advance(&self, by: Duration) {
        let mut now = lock(&self.0);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *lock(&self.0)
    }
}

/// A panic while holding one of these locks cannot leave the data half-updated (every update is
/// a single assignment or insert), so a poisoned lock is still safe to use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Inner {
    certs: HashMap<Identity, Arc<WorkloadCert>>,
    last_generation: u64,
}

/// Caches one certificate per identity and mints or renews on demand.
///
/// Holders of an `Arc<WorkloadCert>` keep using it undisturbed; renewal only changes what the
/// next `get` returns, so established connections are unaffected and new ones get the new cert.
pub struct CertStore {
    minter: Minter,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl CertStore {
    pub fn new(minter: Minter) -> Self {
        Self::with_clock(minter, Arc::new(SystemClock))
    }

    pub fn with_clock(minter: Minter, clock: Arc<dyn Clock>) -> Self {
        Self {
            minter,
            clock,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The cached certificate for `identity`, minting a new one when there is none or the cached
    /// one is past half its lifetime.
    pub fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, MintError> {
        let now = self.clock.now();
        // Minting under the lock keeps concurrent first handshakes of one workload from minting
        // several certificates (and generations) for the same renewal; a mint takes well under
        // a millisecond.
        let mut inner = lock(&self.inner);
        if let Some(cert) = inner.certs.get(identity)
            && !cert.needs_renewal(now)
        {
            return Ok(Arc::clone(cert));
        }
        let generation = inner.last_generation + 1;
        let cert = Arc::new(self.minter.mint(identity, now, generation)?);
        inner.last_generation = generation;
        inner.certs.insert(identity.clone(), Arc::clone(&cert));
        tracing::debug!(%identity, generation, "minted workload certificate");
        Ok(cert)
    }

    /// Renews every cached certificate that is due, so a background task can keep minting off
    /// the handshake path. Returns the identities that failed, with why.
    pub fn renew_due(&self) -> Vec<(Identity, MintError)> {
        let now = self.clock.now();
        let due: Vec<Identity> = lock(&self.inner)
            .certs
            .values()
            .filter(|c| c.needs_renewal(now))
            .map(|c| c.identity().clone())
            .collect();
        due.into_iter()
            .filter_map(|id| self.get(&id).err().map(|e| (id, e)))
            .collect()
    }

    /// Drops the certificate of a workload that left the node.
    pub fn remove(&self, identity: &Identity) -> bool {
        lock(&self.inner).certs.remove(identity).is_some()
    }

    /// The earliest `not_after` among cached certificates.
    pub fn soonest_expiry(&self) -> Option<SystemTime> {
        lock(&self.inner)
            .certs
            .values()
            .map(|c| c.not_after())
            .min()
    }

    /// When the next cached certificate becomes due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        lock(&self.inner).certs.values().map(|c| c.renew_at()).min()
    }

    /// All cached certificates, ordered by identity.
    pub fn list(&self) -> Vec<Arc<WorkloadCert>> {
        let mut certs: Vec<_> = lock(&self.inner).certs.values().cloned().collect();
        certs.sort_by(|a, b| a.identity().cmp(b.identity()));
        certs
    }

    pub fn bundle(&self) -> &TrustBundle {
        self.minter.bundle()
    }

    pub fn minter(&self) -> &Minter {
        &self.minter
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("minter", &self.minter)
            .field("certs", &lock(&self.inner).certs.len())
            .finish()
    }
}
