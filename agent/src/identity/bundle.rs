//! The trust bundle: the root certificates every Ferry agent of a trust domain accepts.

use std::{fmt, path::Path, sync::Arc};

use rustls::{RootCertStore, pki_types::CertificateDer};

use super::spiffe::TrustDomain;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read trust bundle {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("trust bundle {origin}: malformed PEM: {source}")]
    Pem {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("trust bundle {origin} contains no certificate")]
    Empty { origin: String },
    #[error("trust bundle {origin}: certificate #{index} is not a usable trust anchor: {source}")]
    BadCertificate {
        origin: String,
        index: usize,
        #[source]
        source: rustls::Error,
    },
}

/// Root certificates plus the trust domain they vouch for.
///
/// The trust domain travels with the roots because a chain to our roots is not enough: the TLS
/// layer must also check the peer's SPIFFE id is in *our* trust domain, and keeping both in one
/// value means no caller can pair a bundle with the wrong domain. Cheap to clone.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    certs: Arc<[CertificateDer<'static>]>,
}

impl TrustBundle {
    /// `origin` names where the PEM came from, for error messages.
    pub fn from_pem(
        trust_domain: TrustDomain,
        pem: &str,
        origin: &str,
    ) -> Result<Self, BundleError> {
        let certs = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| BundleError::Pem {
                origin: origin.to_owned(),
                source,
            })?;
        Self::from_der(trust_domain, certs, origin)
    }

    pub fn from_der(
        trust_domain: TrustDomain,
        certs: Vec<CertificateDer<'static>>,
        origin: &str,
    ) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::Empty {
                origin: origin.to_owned(),
            });
        }
        let mut roots = RootCertStore::empty();
        for (index, cert) in certs.iter().enumerate() {
            roots
                .add(cert.clone())
                .map_err(|source| BundleError::BadCertificate {
                    origin: origin.to_owned(),
                    index,
                    source,
                })?;
        }
        Ok(Self {
            trust_domain,
            roots: Arc::new(roots),
            certs: certs.into(),
        })
    }

    pub fn load(trust_domain: TrustDomain, path: &Path) -> Result<Self, BundleError> {
        let origin = path.display().to_string();
        let pem = std::fs::read_to_string(path).map_err(|source| BundleError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::from_pem(trust_domain, &pem, &origin)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn root_store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.certs.len())
            .finish()
    }
}
