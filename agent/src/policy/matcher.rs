//! Compiled rules and how they match one connection.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Request;

/// Istio's string match. `*` alone means "present": it never matches an absent attribute, such as
/// the principal of a plaintext connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl StringMatch {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty string: use \"*\" to match any value".to_owned());
        }
        Ok(if s == "*" {
            StringMatch::Present
        } else if let Some(suffix) = s.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = s.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Present => !value.is_empty(),
        }
    }
}

/// The attributes of a connection that rules look at, computed once per evaluation.
pub(super) struct Attributes<'a> {
    principal: Option<String>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Attributes<'a> {
    pub(super) fn of(req: &Request<'a>) -> Self {
        Attributes {
            principal: req.source.map(|id| id.principal()),
            namespace: req.source.map(|id| id.namespace()),
            service_account: req.source.map(|id| id.service_account()),
            // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policies write a.b.c.d.
            source_ip: req.source_ip.to_canonical(),
            destination_ip: req.destination_ip.to_canonical(),
            destination_port: req.destination_port,
        }
    }
}

/// What one field (or one `when` value list) requires; the values of a list are alternatives.
#[derive(Debug, Clone)]
pub(super) enum Matcher {
    Principal(Vec<StringMatch>),
    Namespace(Vec<StringMatch>),
    /// (namespace, name) pairs, namespace already defaulted to the policy's.
    ServiceAccount(Vec<(String, String)>),
    SourceIp(Vec<IpNet>),
    DestinationIp(Vec<IpNet>),
    DestinationPort(Vec<u16>),
}

impl Matcher {
    /// `None` when the connection does not have the attribute (no peer identity).
    fn matches(&self, a: &Attributes<'_>) -> Option<bool> {
        Some(match self {
            Matcher::Principal(pats) => {
                let p = a.principal.as_deref()?;
                pats.iter().any(|m| m.matches(p))
            }
            Matcher::Namespace(pats) => {
                let ns = a.namespace?;
                pats.iter().any(|m| m.matches(ns))
            }
            Matcher::ServiceAccount(accounts) => {
                let (ns, sa) = (a.namespace?, a.service_account?);
                accounts.iter().any(|(n, s)| n == ns && s == sa)
            }
            Matcher::SourceIp(nets) => nets.iter().any(|n| n.contains(&a.source_ip)),
            Matcher::DestinationIp(nets) => nets.iter().any(|n| n.contains(&a.destination_ip)),
            Matcher::DestinationPort(ports) => ports.contains(&a.destination_port),
        })
    }
}

/// One field of a source/operation, or one half (`values`/`notValues`) of a `when` condition.
#[derive(Debug, Clone)]
pub(super) struct Check {
    pub negated: bool,
    pub matcher: Matcher,
}

impl Check {
    pub(super) fn positive(matcher: Matcher) -> Self {
        Check {
            negated: false,
            matcher,
        }
    }

    pub(super) fn negative(matcher: Matcher) -> Self {
        Check {
            negated: true,
            matcher,
        }
    }

    fn matches(&self, a: &Attributes<'_>) -> bool {
        match self.matcher.matches(a) {
            // As in Istio: `principals: ["*"]` needs a peer identity, `notPrincipals: [X]` is met
            // by a connection without one.
            None => self.negated,
            Some(hit) => hit != self.negated,
        }
    }
}

/// All checks must match (the fields of one source or operation). No checks: matches anything.
#[derive(Debug, Clone, Default)]
pub(super) struct Clause(pub Vec<Check>);

impl Clause {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        self.0.iter().all(|c| c.matches(a))
    }
}

/// A compiled rule. Its position in the policy's rule list is kept (rules are never removed) so
/// decisions can cite the index the author sees.
#[derive(Debug, Clone)]
pub(super) enum Rule {
    /// An ALLOW rule that needs HTTP attributes: Ferry cannot see them, so it grants nothing.
    Never,
    Match {
        /// Alternatives (`from` entries); empty list: any source.
        from: Vec<Clause>,
        /// Alternatives (`to` entries); empty list: any operation.
        to: Vec<Clause>,
        /// All must match.
        when: Clause,
    },
}

impl Rule {
    pub(super) fn matches(&self, a: &Attributes<'_>) -> bool {
        match self {
            Rule::Never => false,
            Rule::Match { from, to, when } => {
                any_or_empty(from, a) && any_or_empty(to, a) && when.matches(a)
            }
        }
    }

    /// Whether the rule matches every connection (used to warn about DENY rules that became
    /// unconditional once their HTTP-only parts were dropped).
    pub(super) fn is_unconditional(&self) -> bool {
        match self {
            Rule::Never => false,
            Rule::Match { from, to, when } => {
                let open = |c: &Vec<Clause>| c.is_empty() || c.iter().any(|cl| cl.0.is_empty());
                open(from) && open(to) && when.0.is_empty()
            }
        }
    }
}

fn any_or_empty(clauses: &[Clause], a: &Attributes<'_>) -> bool {
    clauses.is_empty() || clauses.iter().any(|c| c.matches(a))
}
