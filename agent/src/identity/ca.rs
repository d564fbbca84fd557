//! Offline CA material: the mesh root and one intermediate per node.
//!
//! The root key only ever lives on the operator's machine; each node agent holds an intermediate
//! limited to path length 0, so a stolen node key can mint workload certificates but no further CAs.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use super::{
    spiffe::{TrustDomain, is_dns1123_subdomain},
    x509::{
        CLOCK_SKEW_ALLOWANCE, first_cert_from_pem, is_ca, not_after, parse_cert,
        public_key_matches, to_x509_time, truncate_to_secs,
    },
};

pub const ROOT_CERT_FILE: &str = "root.pem";
pub const ROOT_KEY_FILE: &str = "root.key";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";
pub const BUNDLE_FILE: &str = "bundle.pem";

const ROOT_COMMON_NAME: &str = "Ferry root CA";
const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite an existing CA")]
    AlreadyExists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: not a usable private key: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("private key {key} does not belong to certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{path}: the subject has no organization naming a valid trust domain \
         (was it created by `ca_init`?)"
    )]
    NoTrustDomain { path: PathBuf },
    #[error("{path} expired; create a new root")]
    RootExpired { path: PathBuf },
    #[error("node name {name:?} is not a valid Kubernetes node name (DNS-1123 subdomain)")]
    BadNodeName { name: String },
    #[error("validity {validity:?} is zero or reaches past what X.509 can express")]
    BadValidity { validity: Duration },
    #[error("system clock is before 1970")]
    Clock,
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Paths written by [`ca_init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Paths written by [`issue_node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// Creates a self-signed root CA for `trust_domain` in `out_dir` (`root.pem`, `root.key`).
///
/// Refuses to overwrite an existing root: replacing it silently would orphan every node
/// certificate already issued.
pub fn ca_init(
    trust_domain: &TrustDomain,
    out_dir: &Path,
    validity: Duration,
) -> Result<CaFiles, CaError> {
    let files = CaFiles {
        cert: out_dir.join(ROOT_CERT_FILE),
        key: out_dir.join(ROOT_KEY_FILE),
    };
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(CaError::AlreadyExists { path: path.clone() });
        }
    }
    let (not_before, not_after) = validity_window(SystemTime::now(), validity, None)?;

    let mut params = CertificateParams::default();
    // A name of its own: two roots of one trust domain (say, a test CA and the real one) must not
    // look alike, or a chain from the other root is reported as a bad signature, not an unknown issuer.
    let unique = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let common_name = format!(
        "{ROOT_COMMON_NAME} {:x}",
        unique ^ u128::from(std::process::id())
    );
    params.distinguished_name = ca_name(&common_name, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;

    create_dir(out_dir)?;
    write_new(&files.key, key.serialize_pem().as_bytes(), SECRET_MODE)?;
    write_new(&files.cert, cert.pem().as_bytes(), PUBLIC_MODE)?;
    Ok(files)
}

/// Issues the intermediate CA of node `node_name` from the root in `ca_dir`, writing `node.pem`,
/// `node.key` and `bundle.pem` (the root, which every agent trusts) into `out_dir`.
///
/// The intermediate never outlives the root. Existing node files are replaced (re-issuing is how
/// a node's CA is rotated); each file is replaced atomically.
pub fn issue_node(
    ca_dir: &Path,
    node_name: &str,
    out_dir: &Path,
    validity: Duration,
) -> Result<NodeFiles, CaError> {
    if !is_dns1123_subdomain(node_name) {
        return Err(CaError::BadNodeName {
            name: node_name.to_owned(),
        });
    }
    let root_cert_path = ca_dir.join(ROOT_CERT_FILE);
    let root_key_path = ca_dir.join(ROOT_KEY_FILE);
    let root_pem = read(&root_cert_path)?;
    let root_key_pem = read(&root_key_path)?;

    let bad_root = |reason: String| CaError::BadCertificate {
        path: root_cert_path.clone(),
        reason,
    };
    let root_der = first_cert_from_pem(&root_pem).map_err(bad_root)?;
    let root = parse_cert(&root_der).map_err(bad_root)?;
    if !is_ca(&root) {
        return Err(bad_root("not a CA certificate".to_owned()));
    }
    let trust_domain = root
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .and_then(|o| TrustDomain::new(o).ok())
        .ok_or_else(|| CaError::NoTrustDomain {
            path: root_cert_path.clone(),
        })?;
    let root_key = KeyPair::from_pem(&root_key_pem).map_err(|source| CaError::BadKey {
        path: root_key_path.clone(),
        source,
    })?;
    if !public_key_matches(&root, &root_key) {
        return Err(CaError::KeyMismatch {
            cert: root_cert_path,
            key: root_key_path,
        });
    }
    let now = SystemTime::now();
    let root_not_after = not_after(&root);
    if root_not_after <= now {
        return Err(CaError::RootExpired {
            path: root_cert_path,
        });
    }
    let issuer =
        Issuer::from_ca_cert_der(&root_der, root_key).map_err(|e| bad_root(e.to_string()))?;

    let (not_before, not_after) = validity_window(now, validity, Some(root_not_after))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(&format!("Ferry node {node_name}"), &trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;

    let files = NodeFiles {
        cert: out_dir.join(NODE_CERT_FILE),
        key: out_dir.join(NODE_KEY_FILE),
        bundle: out_dir.join(BUNDLE_FILE),
    };
    create_dir(out_dir)?;
    write_replace(&files.key, key.serialize_pem().as_bytes(), SECRET_MODE)?;
    write_replace(&files.cert, cert.pem().as_bytes(), PUBLIC_MODE)?;
    write_replace(&files.bundle, root_pem.as_bytes(), PUBLIC_MODE)?;
    Ok(files)
}

/// The trust domain is kept in the organization so `issue_node` can recover it from the root
/// alone, without the operator repeating (and possibly mistyping) it.
fn ca_name(common_name: &str, trust_domain: &TrustDomain) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity_window(
    now: SystemTime,
    validity: Duration,
    cap: Option<SystemTime>,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), CaError> {
    let bad = || CaError::BadValidity { validity };
    if validity.is_zero() {
        return Err(bad());
    }
    let now = truncate_to_secs(now).ok_or(CaError::Clock)?;
    let start = now
        .checked_sub(CLOCK_SKEW_ALLOWANCE)
        .ok_or(CaError::Clock)?;
    let mut end = now.checked_add(validity).ok_or_else(bad)?;
    if let Some(cap) = cap.filter(|cap| *cap < end) {
        tracing::warn!(
            requested = ?validity,
            "node certificate validity capped to the root's expiry"
        );
        end = cap;
    }
    Ok((
        to_x509_time(start).ok_or(CaError::Clock)?,
        to_x509_time(end).ok_or_else(bad)?,
    ))
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    // 0700: the directory holds private keys; only applies to directories created here.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write_err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    // create_new closes the race between the existence check and the write.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => write_err(e),
        })?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Write-then-rename, so an agent reading concurrently sees the old or the new file, never half.
fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A leftover temp file could carry looser permissions; the mode only applies on creation.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CaError::Write {
                path: tmp,
                source: e,
            });
        }
        _ => {}
    }
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::prelude::X509Certificate;

    use super::*;
    use crate::identity::x509::from_unix_timestamp;

    const DAY: Duration = Duration::from_secs(86_400);

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").expect("valid")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    fn load(path: &Path) -> Vec<u8> {
        let pem = fs::read_to_string(path).expect("read");
        first_cert_from_pem(&pem).expect("pem").to_vec()
    }

    fn organization(cert: &X509Certificate<'_>) -> String {
        cert.subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .expect("organization")
            .to_owned()
    }

    #[test]
    fn root_is_a_self_signed_unconstrained_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ca_init(&td(), dir.path(), 3650 * DAY).expect("ca_init");
        assert_eq!(files.cert, dir.path().join("root.pem"));
        assert_eq!(mode(&files.key), 0o600);

        let der = load(&files.cert);
        let cert = parse_cert(&der).expect("parse");
        let bc = cert.basic_constraints().expect("bc").expect("present");
        assert!(bc.critical);
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, None);
        let ku = cert.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(organization(&cert), "cluster.local");
        assert_eq!(cert.subject(), cert.issuer());
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(
            lifetime,
            (3650 * DAY + CLOCK_SKEW_ALLOWANCE).as_secs() as i64
        );
        KeyPair::from_pem(&fs::read_to_string(&files.key).expect("key")).expect("key parses");
    }

    #[test]
    fn ca_init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        ca_init(&td(), dir.path(), DAY).expect("first");
        let before = fs::read(dir.path().join("root.key")).expect("key");
        let err = ca_init(&td(), dir.path(), DAY).expect_err("second must fail");
        assert!(matches!(&err, CaError::AlreadyExists { path } if path.ends_with("root.pem")));
        assert_eq!(fs::read(dir.path().join("root.key")).expect("key"), before);
    }

    #[test]
    fn ca_init_rejects_zero_validity() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            ca_init(&td(), dir.path(), Duration::ZERO),
            Err(CaError::BadValidity { .. })
        ));
        assert!(matches!(
            ca_init(&td(), dir.path(), Duration::from_secs(u64::MAX)),
            Err(CaError::BadValidity { .. })
        ));
        assert!(!dir.path().join("root.key").exists());
    }

    #[test]
    fn node_intermediate_is_pathlen_zero_ca_signed_by_root() {
        let ca = tempfile::tempdir().expect("tempdir");
        let node = tempfile::tempdir().expect("tempdir");
        let node_dir = node.path().join("nested/node");
        ca_init(&td(), ca.path(), 3650 * DAY).expect("ca_init");
        let files = issue_node(ca.path(), "worker-1.example", &node_dir, 30 * DAY).expect("issue");
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(mode(&node_dir), 0o700);

        let root_der = load(&ca.path().join("root.pem"));
        let root = parse_cert(&root_der).expect("root");
        let der = load(&files.cert);
        let cert = parse_cert(&der).expect("node");
        let bc = cert
            .basic_constraints()
            .expect("bc")
            .expect("present")
            .value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign());
        assert_eq!(cert.issuer(), root.subject());
        assert_eq!(organization(&cert), "cluster.local");
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok());
        assert_eq!(cn, Some("Ferry node worker-1.example"));
        cert.verify_signature(Some(root.public_key()))
            .expect("node certificate must be signed by the root key");
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, (30 * DAY + CLOCK_SKEW_ALLOWANCE).as_secs() as i64);

        assert_eq!(
            fs::read(&files.bundle).expect("bundle"),
            fs::read(ca.path().join("root.pem")).expect("root")
        );
        let leftovers: Vec<_> = fs::read_dir(&node_dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn node_validity_is_capped_by_root() {
        let ca = tempfile::tempdir().expect("tempdir");
        ca_init(&td(), ca.path(), DAY).expect("ca_init");
        let files = issue_node(ca.path(), "n", ca.path(), 365 * DAY).expect("issue");
        let root = load(&ca.path().join("root.pem"));
        let node = load(&files.cert);
        let root_end = parse_cert(&root)
            .expect("root")
            .validity()
            .not_after
            .timestamp();
        let node_end = parse_cert(&node)
            .expect("node")
            .validity()
            .not_after
            .timestamp();
        assert_eq!(node_end, root_end);
        assert!(from_unix_timestamp(node_end) > SystemTime::now());
    }

    #[test]
    fn reissuing_a_node_replaces_its_files() {
        let ca = tempfile::tempdir().expect("tempdir");
        ca_init(&td(), ca.path(), DAY).expect("ca_init");
        let first = issue_node(ca.path(), "n", ca.path(), DAY).expect("issue");
        let key1 = fs::read(&first.key).expect("key");
        issue_node(ca.path(), "n", ca.path(), DAY).expect("reissue");
        assert_ne!(fs::read(&first.key).expect("key"), key1);
        assert_eq!(mode(&first.key), 0o600);
    }

    #[test]
    fn issue_node_names_the_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = issue_node(dir.path(), "n", dir.path(), DAY).expect_err("no CA");
        assert!(matches!(&err, CaError::Read { path, .. } if path.ends_with("root.pem")));
        assert!(err.to_string().contains("root.pem"), "{err}");
    }

    #[test]
    fn issue_node_rejects_corrupt_or_mismatched_material() {
        let ca = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        ca_init(&td(), ca.path(), DAY).expect("ca_init");
        ca_init(&td(), other.path(), DAY).expect("ca_init");
        let out = tempfile::tempdir().expect("tempdir");

        fs::copy(other.path().join("root.key"), ca.path().join("root.key")).expect("copy");
        let err = issue_node(ca.path(), "n", out.path(), DAY).expect_err("mismatch");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("root.key") && err.to_string().contains("root.pem"));

        fs::write(ca.path().join("root.key"), "garbage").expect("write");
        let err = issue_node(ca.path(), "n", out.path(), DAY).expect_err("bad key");
        assert!(matches!(&err, CaError::BadKey { path, .. } if path.ends_with("root.key")));

        fs::write(
            ca.path().join("root.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = issue_node(ca.path(), "n", out.path(), DAY).expect_err("bad cert");
        assert!(matches!(&err, CaError::BadCertificate { path, .. } if path.ends_with("root.pem")));

        fs::write(ca.path().join("root.pem"), "hello").expect("write");
        let err = issue_node(ca.path(), "n", out.path(), DAY).expect_err("no cert");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        assert!(!out.path().join("node.key").exists());
    }

    #[test]
    fn issue_node_rejects_a_non_ca_root() {
        let ca = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = ca_name("leaf", &td());
        let cert = params.self_signed(&key).expect("cert");
        fs::write(ca.path().join("root.pem"), cert.pem()).expect("write");
        fs::write(ca.path().join("root.key"), key.serialize_pem()).expect("write");
        let err = issue_node(ca.path(), "n", ca.path(), DAY).expect_err("not a CA");
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn issue_node_rejects_bad_node_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in ["", "Node1", "a/b", "-a", "a..b"] {
            assert!(matches!(
                issue_node(dir.path(), bad, dir.path(), DAY),
                Err(CaError::BadNodeName { .. })
            ));
        }
    }
}
