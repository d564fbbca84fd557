//! Workload certificates (X.509-SVIDs) minted by the node intermediate.

use std::{
    fmt,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};

use super::{
    bundle::{BundleError, TrustBundle},
    ca::{BUNDLE_FILE, NODE_CERT_FILE, NODE_KEY_FILE},
    spiffe::{Identity, TrustDomain},
    x509::{
        CLOCK_SKEW_ALLOWANCE, first_cert_from_pem, is_ca, not_after, parse_cert,
        public_key_matches, to_x509_time, truncate_to_secs,
    },
};

/// Istio's default workload certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node certificate: {reason}")]
    BadNodeCertificate { reason: String },
    #[error("node key: {0}")]
    BadNodeKey(#[source] rcgen::Error),
    #[error("the node key does not belong to the node certificate")]
    NodeKeyMismatch,
    #[error("the node certificate does not chain to the trust bundle: {0}")]
    NodeNotTrusted(#[source] rustls::Error),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("refusing to mint {identity}: this node only issues for trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: TrustDomain,
    },
    #[error("the node certificate has expired; re-issue it with `issue_node`")]
    NodeExpired,
    #[error("TTL {ttl:?} is too short or not representable")]
    BadTtl { ttl: Duration },
    #[error("system clock is outside the range X.509 can express")]
    Clock,
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("minted key unusable by rustls: {0}")]
    Key(#[source] rustls::Error),
}

/// A minted workload certificate. Immutable; renewal produces a new value with a higher
/// `generation`.
pub struct WorkloadCert {
    identity: Identity,
    generation: u64,
    not_before: SystemTime,
    not_after: SystemTime,
    certified_key: Arc<CertifiedKey>,
    /// Kept only so `ferry ca issue-workload` can write the key out for a non-Ferry peer.
    key_pkcs8: Vec<u8>,
}

impl WorkloadCert {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Monotonic across one [`CertStore`](super::CertStore): a higher value is a newer cert.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Half-life: renewing here leaves peers with lagging clocks and in-flight handshakes plenty
    /// of margin before the old certificate stops verifying.
    /// Measured from issuance, not from the back-dated `not_before`: with a short TTL the back-dating
    /// would otherwise put half-life in the past and renew on every use.
    pub fn renew_at(&self) -> SystemTime {
        let issued = (self.not_before + CLOCK_SKEW_ALLOWANCE).min(self.not_after);
        let lifetime = self.not_after.duration_since(issued).unwrap_or_default();
        issued + lifetime / 2
    }

    /// Whether the cert should be replaced at `now`: past half-life, or not yet valid (the clock
    /// stepped back further than the back-dating covers).
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        now >= self.renew_at() || now < self.not_before
    }

    /// `[leaf, node intermediate]`, DER.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `mint` always builds a two-element chain.
        &self.certified_key.cert[0]
    }

    /// Chain and signing key, ready for rustls.
    /// The chain and the private key as PEM, for peers that are not Ferry agents.
    pub fn to_pem(&self) -> (String, String) {
        let chain = self
            .chain()
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_ref()))
            .collect();
        (chain, pem_block("PRIVATE KEY", &self.key_pkcs8))
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified_key)
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("generation", &self.generation)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Signs workload certificates with the node intermediate.
pub struct Minter {
    issuer: Issuer<'static, KeyPair>,
    node_cert: CertificateDer<'static>,
    node_not_after: SystemTime,
    bundle: TrustBundle,
    ttl: Duration,
    provider: Arc<CryptoProvider>,
}

impl Minter {
    /// Checks up front that the key matches the certificate and that the certificate chains to
    /// `bundle`, so a misassembled node directory fails at start-up rather than as handshake
    /// failures on every peer.
    pub fn new(
        node_cert_pem: &str,
        node_key_pem: &str,
        bundle: TrustBundle,
    ) -> Result<Self, MintError> {
        let bad = |reason: String| MintError::BadNodeCertificate { reason };
        let node_cert = first_cert_from_pem(node_cert_pem).map_err(bad)?;
        let parsed = parse_cert(&node_cert).map_err(bad)?;
        if !is_ca(&parsed) {
            return Err(bad("not a CA certificate".to_owned()));
        }
        let key = KeyPair::from_pem(node_key_pem).map_err(MintError::BadNodeKey)?;
        if !public_key_matches(&parsed, &key) {
            return Err(MintError::NodeKeyMismatch);
        }
        let node_not_after = not_after(&parsed);
        let issuer = Issuer::from_ca_cert_der(&node_cert, key).map_err(|e| bad(e.to_string()))?;
        let minter = Self {
            issuer,
            node_cert,
            node_not_after,
            bundle,
            ttl: DEFAULT_TTL,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        minter.check_chains_to_bundle()?;
        Ok(minter)
    }

    /// Loads `node.pem`, `node.key` and `bundle.pem` from a directory written by `issue_node`.
    pub fn load(node_dir: &Path, trust_domain: TrustDomain) -> Result<Self, MintError> {
        let read = |name: &str| {
            let path = node_dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| MintError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let cert = read(NODE_CERT_FILE)?;
        let key = read(NODE_KEY_FILE)?;
        let bundle = TrustBundle::load(trust_domain, &node_dir.join(BUNDLE_FILE))?;
        Self::new(&cert, &key, bundle)
    }

    /// Sets the lifetime of minted certificates (default [`DEFAULT_TTL`]). It must exceed the
    /// clock-skew back-dating so renewal (at half-life) happens after issuance.
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self, MintError> {
        if ttl < Duration::from_secs(2) {
            return Err(MintError::BadTtl { ttl });
        }
        self.ttl = ttl;
        Ok(self)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.bundle.trust_domain()
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn node_not_after(&self) -> SystemTime {
        self.node_not_after
    }

    /// Mints `[leaf, node]` for `identity`, valid from `now - 1 min` for the TTL (never past the
    /// node certificate). `generation` is assigned by the caller (the store) to keep it monotonic.
    pub(crate) fn mint(
        &self,
        identity: &Identity,
        now: SystemTime,
        generation: u64,
    ) -> Result<WorkloadCert, MintError> {
        if identity.trust_domain() != self.trust_domain() {
            return Err(MintError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain().clone(),
            });
        }
        let now = truncate_to_secs(now).ok_or(MintError::Clock)?;
        if now >= self.node_not_after {
            return Err(MintError::NodeExpired);
        }
        let not_before = now
            .checked_sub(CLOCK_SKEW_ALLOWANCE)
            .ok_or(MintError::Clock)?;
        let wanted_end = now
            .checked_add(self.ttl)
            .ok_or(MintError::BadTtl { ttl: self.ttl })?;
        if wanted_end > self.node_not_after {
            tracing::warn!(
                %identity,
                "workload certificate lifetime cut short by the node certificate's expiry"
            );
        }
        let not_after = wanted_end.min(self.node_not_after);

        let mut params = CertificateParams::default();
        // Empty subject: the SPIFFE id is the only name, and rcgen then marks the SAN critical
        // as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_x509_time(not_before).ok_or(MintError::Clock)?;
        params.not_after = to_x509_time(not_after).ok_or(MintError::Clock)?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let key_pkcs8 = key.serialize_der();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.clone()));
        let certified_key = CertifiedKey::from_der(
            vec![leaf.der().clone(), self.node_cert.clone()],
            key_der,
            &self.provider,
        )
        .map_err(MintError::Key)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            generation,
            not_before,
            not_after,
            certified_key: Arc::new(certified_key),
            key_pkcs8,
        })
    }

    fn check_chains_to_bundle(&self) -> Result<(), MintError> {
        let probe_id =
            Identity::new(self.trust_domain().clone(), "ferry-probe", "probe").map_err(|e| {
                MintError::BadNodeCertificate {
                    reason: e.to_string(),
                }
            })?;
        let now = SystemTime::now();
        let probe = self.mint(&probe_id, now, 0)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(
            self.bundle.root_store(),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| MintError::NodeNotTrusted(rustls::Error::General(e.to_string())))?;
        let unix_now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map_err(|_| MintError::Clock)?,
        );
        verifier
            .verify_client_cert(probe.leaf(), &probe.chain()[1..], unix_now)
            .map_err(MintError::NodeNotTrusted)?;
        Ok(())
    }
}

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minter")
            .field("trust_domain", self.trust_domain())
            .field("ttl", &self.ttl)
            .field("node_not_after", &self.node_not_after)
            .finish_non_exhaustive()
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}
