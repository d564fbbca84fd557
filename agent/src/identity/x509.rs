//! Small helpers shared by CA and minting code: time conversion and certificate inspection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Peers may run slightly behind; back-dating not_before keeps a fresh certificate valid for them.
pub(crate) const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// X.509 times have one-second resolution; truncating up front keeps the times we record equal to
/// the times written into the certificate.
pub(crate) fn truncate_to_secs(t: SystemTime) -> Option<SystemTime> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// `None` for times X.509 cannot express (before 1970 here, or past year 9999).
pub(crate) fn to_x509_time(t: SystemTime) -> Option<OffsetDateTime> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let dt = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    (dt.year() <= 9999).then_some(dt)
}

pub(crate) fn from_unix_timestamp(ts: i64) -> SystemTime {
    match u64::try_from(ts) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH
            .checked_sub(Duration::from_secs(ts.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH),
    }
}

/// First certificate of a PEM text; `Err` carries a human-readable reason.
pub(crate) fn first_cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, String> {
    match rustls_pemfile::certs(&mut pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(format!("malformed PEM: {e}")),
        None => Err("no CERTIFICATE block found".to_owned()),
    }
}

pub(crate) fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".to_owned()),
        Err(e) => Err(format!("not a valid X.509 certificate: {e}")),
    }
}

pub(crate) fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

pub(crate) fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    from_unix_timestamp(cert.validity().not_after.timestamp())
}

pub(crate) fn public_key_matches(cert: &X509Certificate<'_>, key: &rcgen::KeyPair) -> bool {
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}
