//! SPIFFE identities and the certificates that prove them.
//!
//! - [`spiffe`]: `TrustDomain`, `Identity` (`spiffe://<td>/ns/<ns>/sa/<sa>`).
//! - [`ca`]: offline root and per-node intermediate CA files.
//! - [`bundle`]: the trust bundle (roots + trust domain).
//! - [`mint`]: workload certificates signed by the node intermediate.
//! - [`store`]: per-identity cache with renewal at half-life.

pub mod bundle;
pub mod ca;
pub mod mint;
pub mod spiffe;
pub mod store;
mod x509;

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use bundle::{BundleError, TrustBundle};
pub use ca::{CaError, CaFiles, NodeFiles, ca_init, issue_node};
pub use mint::{DEFAULT_TTL, MintError, Minter, WorkloadCert};
pub use spiffe::{Identity, SpiffeIdError, TrustDomain};
pub use store::{CertStore, Clock, ManualClock, SystemClock};
