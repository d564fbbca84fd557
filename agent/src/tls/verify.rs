//! Certificate verifiers: webpki chain validation plus Ferry's SPIFFE checks.
//!
//! rustls' verifiers cannot express "URI SAN in trust domain X" (webpki has no URI name
//! constraints), so both directions wrap chain validation with an explicit SAN check.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{TlsError, peer_identity, uri_sans};
use crate::identity::{Identity, TrustBundle, TrustDomain};

fn reject(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// Ferry's own verdict inside a rustls error (as returned by a failed handshake), so callers can
/// log or count identity failures separately from transport errors.
pub fn verification_error(error: &rustls::Error) -> Option<&TlsError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<TlsError>()
        }
        _ => None,
    }
}

/// Server side: client chain to the bundle (clientAuth) and a SPIFFE id of our trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: &TrustBundle, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let chain =
            WebPkiClientVerifier::builder_with_provider(bundle.root_store(), provider).build()?;
        Ok(Self {
            chain,
            trust_domain: bundle.trust_domain().clone(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = peer_identity(std::slice::from_ref(end_entity)).map_err(reject)?;
        if presented.trust_domain() != &self.trust_domain {
            return Err(reject(TlsError::ForeignTrustDomain {
                expected: self.trust_domain.clone(),
                presented,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Client side: server chain to the bundle (serverAuth) and a URI SAN equal to an expected
/// identity. The server name the connection was opened with is deliberately ignored.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// `expected` must not be empty: a verifier that accepts no identity would fail every
    /// handshake, which is a caller bug better reported here.
    pub fn new(
        bundle: &TrustBundle,
        expected: Vec<Identity>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        if expected.is_empty() {
            return Err(TlsError::NoExpectedIdentity);
        }
        Ok(Self {
            roots: bundle.root_store(),
            expected,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = uri_sans(end_entity).map_err(reject)?;
        let matches = |id: &Identity| {
            let want = id.to_string();
            presented.contains(&want)
        };
        if self.expected.iter().any(matches) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(reject(TlsError::IdentityMismatch {
                expected: self.expected.clone(),
                presented,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A failed handshake as an operator should read it: Ferry's own verdict when one of its verifiers
/// refused the peer ("presented spiffe://… but expected spiffe://…"), else rustls' or the I/O error.
pub fn describe_handshake_error(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => match verification_error(tls) {
            Some(ours) => format!("peer certificate refused: {ours}"),
            None => format!("TLS: {tls}"),
        },
        None => error.to_string(),
    }
}
