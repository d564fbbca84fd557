//! Mutual TLS for HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, SPIFFE identities in URI SANs.
//!
//! Peers are authenticated by chain to the trust bundle plus a SPIFFE id check; DNS/IP names are
//! never consulted because HBONE peers are addressed by pod IP and certificates carry no IP SANs.
//!
//! Server side: one [`ServerConfig`] per in-pod listener (i.e. per destination workload), built
//! with [`server_config_for_workload`]. Its resolver asks the [`CertStore`] on every handshake,
//! so renewed certificates are used by new connections without rebuilding the config.
//!
//! Client side: [`client_config`] per destination (the config carries the expected identity),
//! with the source workload's current certificate from the store.

#[cfg(test)]
mod tests;
mod verify;

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig,
    client::Resumption,
    crypto::{CryptoProvider, ring::cipher_suite},
    pki_types::CertificateDer,
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::{CertifiedKey, SingleCertAndKey},
};
use x509_parser::extensions::GeneralName;

pub use verify::{
    SpiffeClientVerifier, SpiffeServerVerifier, describe_handshake_error, verification_error,
};

use crate::identity::{CertStore, Identity, TrustBundle, TrustDomain, spiffe::SpiffeIdError};

pub const ALPN_H2: &[u8] = b"h2";

const SPIFFE_SCHEME: &str = "spiffe://";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate is not valid X.509: {reason}")]
    BadCertificate { reason: String },
    #[error("peer certificate has no SPIFFE id (URI SAN spiffe://...)")]
    NoSpiffeId,
    #[error("peer certificate has several SPIFFE ids ({}), expected exactly one", .ids.join(", "))]
    AmbiguousSpiffeId { ids: Vec<String> },
    #[error("peer certificate has a malformed SPIFFE id: {0}")]
    BadSpiffeId(#[source] SpiffeIdError),
    #[error("peer identity {presented} is not in trust domain {expected}")]
    ForeignTrustDomain {
        expected: TrustDomain,
        presented: Identity,
    },
    #[error(
        "server identity mismatch: expected {}, server presented {}",
        join(.expected), if .presented.is_empty() { "no URI SAN".to_owned() } else { .presented.join(", ") }
    )]
    IdentityMismatch {
        expected: Vec<Identity>,
        /// Every URI SAN of the server's leaf, verbatim.
        presented: Vec<String>,
    },
    #[error("no expected server identity given")]
    NoExpectedIdentity,
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn join(ids: &[Identity]) -> String {
    ids.iter()
        .map(Identity::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// ring, restricted to the two suites HBONE peers use; TLS 1.2 suites are absent so even a
/// misconfigured version list cannot fall back.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

/// Server config for inbound HBONE: client certificate required, chained to `bundle` for
/// clientAuth and carrying a SPIFFE id of the bundle's trust domain. Which identity may connect
/// is left to authorization policy (use [`peer_identity`] on the accepted connection).
///
/// `resolver` picks the server's own certificate per handshake; see
/// [`server_config_for_workload`] for the usual one.
pub fn server_config(
    bundle: &TrustBundle,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle, Arc::clone(&provider))?);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients never resume (one long-lived pooled connection per peer pair), so storing
    // sessions or sending tickets would only cost memory.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Server config for the listener of one destination workload, presenting that workload's
/// current certificate from `store` (renewed certificates apply to new handshakes).
pub fn server_config_for_workload(
    store: Arc<CertStore>,
    identity: Identity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let bundle = store.bundle().clone();
    server_config(
        &bundle,
        Arc::new(WorkloadCertResolver::new(store, identity)),
    )
}

/// Server config presenting one fixed certificate (tests, or a caller managing renewal itself).
pub fn server_config_with_cert(
    bundle: &TrustBundle,
    cert: Arc<CertifiedKey>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config(bundle, Arc::new(SingleCertAndKey::from(cert)))
}

/// Resolves the server certificate of one workload from the [`CertStore`] at each handshake.
#[derive(Debug)]
pub struct WorkloadCertResolver {
    store: Arc<CertStore>,
    identity: Identity,
}

impl WorkloadCertResolver {
    pub fn new(store: Arc<CertStore>, identity: Identity) -> Self {
        Self { store, identity }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

impl ResolvesServerCert for WorkloadCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.store.get(&self.identity) {
            Ok(cert) => Some(cert.certified_key()),
            Err(error) => {
                // rustls then aborts the handshake; this log is the only place the cause shows.
                tracing::warn!(identity = %self.identity, %error, "no certificate for inbound HBONE handshake");
                None
            }
        }
    }
}

/// Client config for an HBONE connection from the workload holding `own` to a destination that
/// must prove `expected`. The caller connects with `ServerName::IpAddress(destination)`; the name
/// is not checked against the certificate.
pub fn client_config(
    bundle: &TrustBundle,
    own: Arc<CertifiedKey>,
    expected: Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_any_of(bundle, own, vec![expected])
}

/// Like [`client_config`], accepting a server that proves any one of `expected` (a service's
/// listed SANs, e.g. during a service account migration).
pub fn client_config_any_of(
    bundle: &TrustBundle,
    own: Arc<CertifiedKey>,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        expected,
        Arc::clone(&provider),
    )?);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(own)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE identity in the leaf of a verified peer chain (as from
/// `Connection::peer_certificates()`). Requires exactly one `spiffe://` URI SAN; other URI SANs
/// are ignored.
pub fn peer_identity(peer_certs: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = peer_certs.first().ok_or(TlsError::NoPeerCertificate)?;
    let spiffe: Vec<String> = uri_sans(leaf)?
        .into_iter()
        .filter(|uri| uri.starts_with(SPIFFE_SCHEME))
        .collect();
    match spiffe.as_slice() {
        [] => Err(TlsError::NoSpiffeId),
        [one] => one.parse().map_err(TlsError::BadSpiffeId),
        _ => Err(TlsError::AmbiguousSpiffeId { ids: spiffe }),
    }
}

/// All URI SANs of `cert`, verbatim.
pub(crate) fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::BadCertificate {
            reason: e.to_string(),
        })?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate {
            reason: format!("subject alternative name: {e}"),
        })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}
