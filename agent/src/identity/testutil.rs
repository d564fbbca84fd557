//! Test PKI built through the real `ca_init` / `issue_node` code paths.

use std::{sync::Arc, time::Duration};

use super::{CertStore, Clock, Identity, Minter, TrustBundle, TrustDomain, ca_init, issue_node};

pub(crate) const DAY: Duration = Duration::from_secs(86_400);

pub(crate) struct TestPki {
    pub trust_domain: TrustDomain,
    pub node_cert_pem: String,
    pub node_key_pem: String,
    pub bundle_pem: String,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        Self::with_node_validity(trust_domain, 30 * DAY)
    }

    pub fn with_node_validity(trust_domain: &str, validity: Duration) -> Self {
        let td = TrustDomain::new(trust_domain).expect("test trust domain");
        let dir = tempfile::tempdir().expect("tempdir");
        ca_init(&td, dir.path(), 365 * DAY).expect("ca_init");
        let files = issue_node(dir.path(), "test-node", dir.path(), validity).expect("issue_node");
        let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("read test pki");
        Self {
            trust_domain: td,
            node_cert_pem: read(&files.cert),
            node_key_pem: read(&files.key),
            bundle_pem: read(&files.bundle),
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(self.trust_domain.clone(), &self.bundle_pem, "test").expect("bundle")
    }

    pub fn minter(&self) -> Minter {
        Minter::new(&self.node_cert_pem, &self.node_key_pem, self.bundle()).expect("minter")
    }

    /// A minter that claims `other_td` but signs with this PKI's (trusted) node CA: models a
    /// compromised or misconfigured node issuing identities outside our trust domain.
    pub fn minter_for_foreign_domain(&self, other_td: &str) -> Minter {
        let td = TrustDomain::new(other_td).expect("td");
        let bundle = TrustBundle::from_pem(td, &self.bundle_pem, "test").expect("bundle");
        Minter::new(&self.node_cert_pem, &self.node_key_pem, bundle).expect("minter")
    }

    pub fn store(&self) -> Arc<CertStore> {
        Arc::new(CertStore::new(self.minter()))
    }

    pub fn store_with_clock(&self, clock: Arc<dyn Clock>) -> CertStore {
        CertStore::with_clock(self.minter(), clock)
    }
}

pub(crate) fn id(s: &str) -> Identity {
    s.parse().expect("test identity")
}
