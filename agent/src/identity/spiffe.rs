//! SPIFFE identities of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
//!
//! Only this one path shape is accepted because it is the only one Istio ambient issues and
//! authorizes; anything else reaching the mesh is a misconfiguration or an attack, and rejecting
//! it at parse time means no later layer has to re-validate.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// SPIFFE spec limit on the trust domain name.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_DNS_LABEL_LEN: usize = 63;
const MAX_DNS_SUBDOMAIN_LEN: usize = 253;

/// Why a SPIFFE id, trust domain or principal was rejected. Every variant carries the offending
/// input so log lines and CLI errors are actionable on their own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{input:?} is not a SPIFFE id: it must start with \"spiffe://\" (lowercase)")]
    MissingScheme { input: String },
    #[error("{input:?} has an empty trust domain")]
    EmptyTrustDomain { input: String },
    #[error(
        "invalid trust domain {trust_domain:?}: character {bad:?} is not allowed \
         (only lowercase letters, digits, '.', '-' and '_')"
    )]
    TrustDomainCharacter { trust_domain: String, bad: char },
    #[error("trust domain {trust_domain:?} is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong { trust_domain: String },
    #[error("{input:?} does not have the path /ns/<namespace>/sa/<service-account>")]
    BadPath { input: String },
    #[error("namespace {namespace:?} is not a valid Kubernetes DNS-1123 label")]
    BadNamespace { namespace: String },
    #[error("service account {service_account:?} is not a valid Kubernetes DNS-1123 subdomain")]
    BadServiceAccount { service_account: String },
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain {
                input: name.to_owned(),
            });
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong {
                trust_domain: name.to_owned(),
            });
        }
        if let Some(bad) = name.chars().find(|c| !is_trust_domain_char(*c)) {
            return Err(SpiffeIdError::TrustDomainCharacter {
                trust_domain: name.to_owned(),
                bad,
            });
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({:?})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A workload identity `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Fields are private so an `Identity` is valid by construction. Shared: every connection keeps the
/// identities it was decided with, and a clone costs no allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(std::sync::Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        if !is_dns1123_label(namespace) {
            return Err(SpiffeIdError::BadNamespace {
                namespace: namespace.to_owned(),
            });
        }
        if !is_dns1123_subdomain(service_account) {
            return Err(SpiffeIdError::BadServiceAccount {
                service_account: service_account.to_owned(),
            });
        }
        Ok(Self(std::sync::Arc::new(Parts {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    /// Parses Istio's principal form, the SPIFFE id without its scheme
    /// (`cluster.local/ns/foo/sa/bar`), as written in AuthorizationPolicy `principals`.
    pub fn from_principal(principal: &str) -> Result<Self, SpiffeIdError> {
        parse_without_scheme(principal, principal)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The Istio principal form (no scheme), which policies match against.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

fn parse_without_scheme(rest: &str, input: &str) -> Result<Identity, SpiffeIdError> {
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain {
            input: input.to_owned(),
        });
    }
    let trust_domain = TrustDomain::new(td)?;
    let bad_path = || SpiffeIdError::BadPath {
        input: input.to_owned(),
    };
    // Exactly four segments; `splitn` would silently fold extra segments into the account name.
    let segments: Vec<&str> = path
        .strip_prefix('/')
        .ok_or_else(bad_path)?
        .split('/')
        .collect();
    match segments.as_slice() {
        ["ns", ns, "sa", sa] => Identity::new(trust_domain, ns, sa),
        _ => Err(bad_path()),
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes (Kubernetes namespace names).
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_DNS_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-')
}

/// Dot-separated DNS-1123 labels, at most 253 bytes (Kubernetes service account and node names).
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_DNS_SUBDOMAIN_LEN && s.split('.').all(is_dns1123_label)
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

// The URI alone is what operators need in logs and error chains (rustls prints verifier errors
// with `Debug`).
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl FromStr for Identity {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::MissingScheme {
                input: s.to_owned(),
            })?;
        parse_without_scheme(rest, s)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).expect("valid trust domain in test")
    }

    #[test]
    fn parses_and_displays_round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/sleep";
        let id: Identity = s.parse().expect("valid");
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(
            Identity::new(td("cluster.local"), "default", "sleep").expect("valid"),
            id
        );
    }

    #[test]
    fn accepts_edge_cases_kubernetes_allows() {
        for ok in [
            "spiffe://td/ns/a/sa/b",
            "spiffe://my_td-1.example/ns/kube-system/sa/coredns",
            "spiffe://cluster.local/ns/0/sa/a.b.c",
            "spiffe://cluster.local/ns/default/sa/system.serviceaccount-1",
        ] {
            assert!(ok.parse::<Identity>().is_ok(), "{ok} should parse");
        }
        let long_label = "a".repeat(63);
        let id = format!("spiffe://td/ns/{long_label}/sa/{long_label}");
        assert!(id.parse::<Identity>().is_ok());
    }

    #[test]
    fn rejects_malformed_ids() {
        let cases = [
            ("", "MissingScheme"),
            ("cluster.local/ns/a/sa/b", "MissingScheme"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "MissingScheme"),
            ("Spiffe://cluster.local/ns/a/sa/b", "MissingScheme"),
            ("https://cluster.local/ns/a/sa/b", "MissingScheme"),
            ("spiffe:///ns/a/sa/b", "EmptyTrustDomain"),
            ("spiffe://", "EmptyTrustDomain"),
            ("spiffe://Cluster.local/ns/a/sa/b", "TrustDomainCharacter"),
            (
                "spiffe://cluster.local:8080/ns/a/sa/b",
                "TrustDomainCharacter",
            ),
            (
                "spiffe://user@cluster.local/ns/a/sa/b",
                "TrustDomainCharacter",
            ),
            ("spiffe://cluster.local", "BadPath"),
            ("spiffe://cluster.local/", "BadPath"),
            ("spiffe://cluster.local/ns/a", "BadPath"),
            ("spiffe://cluster.local/ns/a/sa", "BadPath"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "BadPath"),
            ("spiffe://cluster.local/ns/a/sa/b/", "BadPath"),
            ("spiffe://cluster.local/sa/b/ns/a", "BadPath"),
            ("spiffe://cluster.local//ns/a/sa/b", "BadPath"),
            ("spiffe://cluster.local/NS/a/sa/b", "BadPath"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a?x/sa/b", "BadNamespace"),
            ("spiffe://cluster.local/ns//sa/b", "BadNamespace"),
            ("spiffe://cluster.local/ns/Default/sa/b", "BadNamespace"),
            ("spiffe://cluster.local/ns/-a/sa/b", "BadNamespace"),
            ("spiffe://cluster.local/ns/a-/sa/b", "BadNamespace"),
            ("spiffe://cluster.local/ns/a.b/sa/b", "BadNamespace"),
            ("spiffe://cluster.local/ns/a/sa/", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a/sa/B", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a/sa/a..b", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a/sa/a_b", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a/sa/%61", "BadServiceAccount"),
            ("spiffe://cluster.local/ns/a/sa/b c", "BadServiceAccount"),
        ];
        for (input, want) in cases {
            let err = input
                .parse::<Identity>()
                .expect_err(&format!("{input:?} must be rejected"));
            let got = format!("{err:?}");
            assert!(
                got.starts_with(want),
                "{input:?}: expected {want}, got {got}"
            );
        }
    }

    #[test]
    fn errors_quote_the_offending_part() {
        let msg = |s: &str| s.parse::<Identity>().expect_err("invalid").to_string();
        assert!(msg("spiffe://cluster.local/ns/Default/sa/b").contains("\"Default\""));
        assert!(msg("spiffe://cluster.local/ns/a/sa/b?x").contains("\"b?x\""));
        assert!(msg("spiffe://Cluster/ns/a/sa/b").contains("'C'"));
        assert!(msg("spiffe://td/ns/a/sa/b/c").contains("spiffe://td/ns/a/sa/b/c"));
    }

    #[test]
    fn rejects_over_long_names() {
        let ns = "a".repeat(64);
        assert!(matches!(
            format!("spiffe://td/ns/{ns}/sa/b").parse::<Identity>(),
            Err(SpiffeIdError::BadNamespace { .. })
        ));
        let sa = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63)
        );
        assert_eq!(sa.len(), 255);
        assert!(matches!(
            format!("spiffe://td/ns/a/sa/{sa}").parse::<Identity>(),
            Err(SpiffeIdError::BadServiceAccount { .. })
        ));
        assert!(matches!(
            TrustDomain::new(&"t".repeat(256)),
            Err(SpiffeIdError::TrustDomainTooLong { .. })
        ));
        assert!(TrustDomain::new(&"t".repeat(255)).is_ok());
    }

    #[test]
    fn trust_domain_rules() {
        assert!(TrustDomain::new("cluster.local").is_ok());
        assert!(TrustDomain::new("a_b-c.9").is_ok());
        for bad in ["", "Cluster", "a/b", "a:1", "ä", "a b"] {
            assert!(TrustDomain::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn new_validates_components() {
        let t = td("cluster.local");
        assert!(Identity::new(t.clone(), "ns", "sa").is_ok());
        assert!(matches!(
            Identity::new(t.clone(), "a/b", "sa"),
            Err(SpiffeIdError::BadNamespace { .. })
        ));
        assert!(matches!(
            Identity::new(t, "ns", "sa/x"),
            Err(SpiffeIdError::BadServiceAccount { .. })
        ));
    }

    #[test]
    fn principal_form() {
        let id = Identity::from_principal("cluster.local/ns/foo/sa/bar").expect("valid");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/bar");
        for bad in [
            "spiffe://cluster.local/ns/foo/sa/bar",
            "/ns/foo/sa/bar",
            "cluster.local/ns/foo",
            "cluster.local/ns/foo/sa/bar/baz",
            "*",
        ] {
            assert!(
                Identity::from_principal(bad).is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn serde_uses_uri_string() {
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().expect("valid");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
        let back: Identity = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        let err = serde_json::from_str::<Identity>("\"spiffe://cluster.local/ns/a/sa/b/c\"")
            .expect_err("extra segment");
        assert!(
            err.to_string()
                .contains("/ns/<namespace>/sa/<service-account>")
        );

        let t: TrustDomain = serde_json::from_str("\"cluster.local\"").expect("td");
        assert_eq!(serde_json::to_string(&t).expect("ser"), "\"cluster.local\"");
        assert!(serde_json::from_str::<TrustDomain>("\"Cluster\"").is_err());
    }

    #[test]
    fn debug_shows_uri() {
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().expect("valid");
        assert_eq!(
            format!("{id:?}"),
            "Identity(spiffe://cluster.local/ns/a/sa/b)"
        );
    }
}
