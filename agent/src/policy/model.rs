//! The AuthorizationPolicy YAML as written, field for field. Everything under `spec` refuses
//! unknown fields: a misspelt `notPrincipals` silently ignored would widen access. Values with a
//! format (patterns, CIDRs, ports) are checked while deserializing so that serde_yaml attaches the
//! line of the bad value to the error.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use super::matcher::StringMatch;

/// One YAML document known to be an AuthorizationPolicy. `apiVersion`, `kind`, `status` and any
/// other top-level field are not declared: they were checked on the untyped pass or are irrelevant.
#[derive(Debug, Deserialize)]
pub(super) struct Document {
    pub metadata: Option<Metadata>,
    pub spec: Option<Spec>,
}

/// Kubernetes object metadata. Not strict: exported objects carry uid, labels, managedFields…
#[derive(Debug, Deserialize)]
pub(super) struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub annotations: Option<BTreeMap<String, serde_yaml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Spec {
    pub selector: Option<Selector>,
    /// Only checked for presence: such policies bind to waypoints, not to ztunnel-style agents.
    pub target_ref: Option<serde_yaml::Value>,
    pub target_refs: Option<serde_yaml::Value>,
    pub rules: Option<Vec<Rule>>,
    pub action: Option<RawAction>,
    /// The external authorizer of a CUSTOM policy; Ferry has none, see `Action::Custom`.
    pub provider: Option<Provider>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Selector {
    pub match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Provider {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub(super) enum RawAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    #[serde(rename = "AUDIT")]
    Audit,
    #[serde(rename = "CUSTOM")]
    Custom,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Rule {
    pub from: Option<Vec<From>>,
    pub to: Option<Vec<To>>,
    pub when: Option<Vec<Condition>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct From {
    pub source: Option<Source>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct To {
    pub operation: Option<Operation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Source {
    pub principals: Option<Vec<Pattern>>,
    pub not_principals: Option<Vec<Pattern>>,
    pub namespaces: Option<Vec<Pattern>>,
    pub not_namespaces: Option<Vec<Pattern>>,
    pub service_accounts: Option<Vec<ServiceAccountRef>>,
    pub not_service_accounts: Option<Vec<ServiceAccountRef>>,
    pub ip_blocks: Option<Vec<IpBlock>>,
    pub not_ip_blocks: Option<Vec<IpBlock>>,
    // HTTP-only: kept as raw strings, only their presence matters.
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Operation {
    pub ports: Option<Vec<Port>>,
    pub not_ports: Option<Vec<Port>>,
    // HTTP-only.
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

/// A `when` condition, with its values already checked against what its key needs.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawCondition")]
pub(super) struct Condition {
    pub key: String,
    pub kind: ConditionKind,
}

#[derive(Debug)]
pub(super) enum ConditionKind {
    /// One of the five keys Ferry can check on a connection.
    L4 {
        values: Option<ConditionValues>,
        not_values: Option<ConditionValues>,
    },
    /// An HTTP attribute (request.*, remote.ip, connection.sni, experimental.*).
    Http,
}

#[derive(Debug)]
pub(super) enum ConditionValues {
    SourceIp(Vec<IpNet>),
    SourceNamespace(Vec<StringMatch>),
    SourcePrincipal(Vec<StringMatch>),
    DestinationIp(Vec<IpNet>),
    DestinationPort(Vec<u16>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCondition {
    key: String,
    values: Option<Vec<String>>,
    not_values: Option<Vec<String>>,
}

/// Keys of Istio's attribute vocabulary that only exist on an HTTP request (or, for
/// `connection.sni`, on a TLS handshake Ferry's HBONE tunnel terminates, not the app's).
fn is_http_key(key: &str) -> bool {
    key.starts_with("request.")
        || key.starts_with("experimental.")
        || key == "remote.ip"
        || key == "connection.sni"
}

impl TryFrom<RawCondition> for Condition {
    type Error = String;

    fn try_from(raw: RawCondition) -> Result<Self, String> {
        let values = raw.values.filter(|v| !v.is_empty());
        let not_values = raw.not_values.filter(|v| !v.is_empty());
        if values.is_none() && not_values.is_none() {
            return Err(format!(
                "when condition on `{}` needs values or notValues",
                raw.key
            ));
        }
        let convert = |list: Option<Vec<String>>| -> Result<Option<ConditionValues>, String> {
            let Some(list) = list else { return Ok(None) };
            let converted = match raw.key.as_str() {
                "source.ip" => ConditionValues::SourceIp(map(&list, parse_ip_block)?),
                "destination.ip" => ConditionValues::DestinationIp(map(&list, parse_ip_block)?),
                "source.namespace" => ConditionValues::SourceNamespace(map(&list, parse_pattern)?),
                "source.principal" => ConditionValues::SourcePrincipal(map(&list, parse_pattern)?),
                "destination.port" => {
                    ConditionValues::DestinationPort(map(&list, |s| parse_port(s.trim()))?)
                }
                _ => unreachable_key(&raw.key)?,
            };
            Ok(Some(converted))
        };
        let kind = if is_http_key(&raw.key) {
            ConditionKind::Http
        } else {
            ConditionKind::L4 {
                values: convert(values)?,
                not_values: convert(not_values)?,
            }
        };
        Ok(Condition { key: raw.key, kind })
    }
}

/// A key that is neither L4 nor a known HTTP attribute: Istio rejects it too, and guessing which
/// side it belongs to could widen access.
fn unreachable_key(key: &str) -> Result<ConditionValues, String> {
    Err(format!(
        "unknown when key `{key}` (L4 keys: source.ip, source.namespace, source.principal, \
         destination.ip, destination.port; HTTP keys: request.*, remote.ip, connection.sni)"
    ))
}

fn map<T>(list: &[String], f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    list.iter().map(|s| f(s)).collect()
}

/// An Istio string match (`exact`, `prefix*`, `*suffix`, `*`), validated.
#[derive(Debug, Clone)]
pub(super) struct Pattern(pub StringMatch);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_pattern(&s).map(Pattern).map_err(de::Error::custom)
    }
}

fn parse_pattern(s: &str) -> Result<StringMatch, String> {
    StringMatch::parse(s)
}

/// A `serviceAccounts` entry: `name` (in the policy's namespace) or `namespace/name`.
#[derive(Debug, Clone)]
pub(super) struct ServiceAccountRef {
    pub namespace: Option<String>,
    pub name: String,
}

impl<'de> Deserialize<'de> for ServiceAccountRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = |why: &str| de::Error::custom(format!("service account {s:?}: {why}"));
        if s.contains('*') {
            return Err(bad("serviceAccounts takes no wildcards"));
        }
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, s.as_str()),
        };
        if name.is_empty() || name.contains('/') || namespace.is_some_and(str::is_empty) {
            return Err(bad("expected `name` or `namespace/name`"));
        }
        Ok(ServiceAccountRef {
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        })
    }
}

/// An `ipBlocks` entry: a CIDR, or a bare address meaning that one host.
#[derive(Debug, Clone, Copy)]
pub(super) struct IpBlock(pub IpNet);

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_ip_block(&s).map(IpBlock).map_err(de::Error::custom)
    }
}

fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
}

/// A port in `ports`/`notPorts`. Istio writes them as strings ("8080"); a YAML integer is accepted
/// too since the meaning is unambiguous.
#[derive(Debug, Clone, Copy)]
pub(super) struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number from 1 to 65535")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                parse_port(v.trim()).map(Port).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                parse_port(&v.to_string()).map(Port).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                parse_port(&v.to_string()).map(Port).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!(
            "{s:?} is not a port number from 1 to 65535 (ranges are not supported by Istio)"
        )),
    }
}
